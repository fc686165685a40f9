//! `ptt-relay`: the command line is `relay::cli`; the binary adds its
//! allocator.

/// mimalloc: the relay allocates and frees small buffers on several threads
/// (tokio workers, the store's committer) at a high rate; glibc's arenas
/// made that a measurable share of its CPU (docs/benchmarks.md). Built
/// without transparent huge pages (`no_thp`): with them an active user cost
/// 76 KiB of RSS instead of 58 (docs/benchmarks.md, "Sessions and memory").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    relay::cli::main()
}
