"""lrkd_fast benchmarks: ``python -m benchmarks`` (or ``lrkd-fast bench``) runs every case side by
side (eager, torch.compile, Liger-Kernel where it has the op, lrkd_fast) and writes CSV + PNG."""
