//! The `toolgate` binary: everything lives in the library; this only hands over the exit code.

/// mimalloc: cheaper per-message allocations than glibc's malloc under two busy threads, and
/// freed memory goes back rather than staying in per-thread arenas (see docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    toolgate::cli::main()
}
