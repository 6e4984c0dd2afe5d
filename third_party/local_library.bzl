"""local_library: a prebuilt C++ library from this machine's Python environment.

TensorFlow and oneDNN come from the venv (the ones kernels/build.py compiles against), at
paths that differ per machine. WORKSPACE therefore names only environment variables;
`python -m tf_bf16.kernels.bazel_config` sets them (--repo_env lines in
third_party/local/bazelrc). The repository symlinks the headers and the shared library and
fills in the BUILD template: %{library} is the library's file name, %{library_dir} its
directory (for an rpath).
"""

# Read through repository_ctx.os.environ; listed so that a new value re-creates the repository.
_ENV = [
    "TF_BF16_TF_INCLUDE",
    "TF_BF16_TF_LIBRARY",
    "TF_BF16_ONEDNN_INCLUDE",
    "TF_BF16_ONEDNN_LIBRARY",
]

def _env(ctx, name):
    value = ctx.os.environ.get(name, "")
    if not value:
        fail("%s is not set: run `python -m tf_bf16.kernels.bazel_config` in the " % name +
             "repository root first (see //:BUILD)")
    return value

def _local_library_impl(ctx):
    include = _env(ctx, ctx.attr.include_env)
    library = ctx.path(_env(ctx, ctx.attr.library_env))
    if not library.exists:
        fail("%s: %s does not exist; rerun bazel_config" % (ctx.attr.library_env, library))

    # Only the named subdirectories, when given: exposing a whole system include directory
    # (/usr/include) with -isystem would reorder the compiler's own search path.
    if ctx.attr.include_subdirs:
        for subdir in ctx.attr.include_subdirs:
            ctx.symlink(include + "/" + subdir, "include/" + subdir)
    else:
        ctx.symlink(include, "include")
    ctx.symlink(library, library.basename)
    ctx.file("WORKSPACE", "workspace(name = \"%s\")\n" % ctx.name)
    ctx.template("BUILD.bazel", ctx.attr.build_file, {
        "%{library}": library.basename,
        "%{library_dir}": str(library.dirname),
    })

local_library = repository_rule(
    implementation = _local_library_impl,
    attrs = {
        "build_file": attr.label(allow_single_file = True, mandatory = True),
        "include_env": attr.string(mandatory = True),
        "include_subdirs": attr.string_list(),
        "library_env": attr.string(mandatory = True),
    },
    environ = _ENV,
)
