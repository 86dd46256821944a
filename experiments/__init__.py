"""The absl binaries. Before any of them imports jax, the process starts itself again with glibc
mapping large blocks on huge pages (a large step's temporaries, mapped afresh every step, then
fault in 2 MB at a time), and every thread is put on one malloc arena, so that the trainer can
keep the memory a small step frees (see `jaxlm.host_memory`)."""

from jaxlm import host_memory

host_memory.restart_with_huge_pages()
host_memory.share_one_arena()
