"""Per-patch engine benchmark (same as ``tuckerseg bench``): stock vs TuckerSeg ratios x engines.

    nice -n 10 python benchmarks/bench_engines.py --json bench_engines.json
    python benchmarks/bench_engines.py --device cuda --configs torch:fp16 torch:f32 --json gpu.json
"""
import sys


from TuckerSegLib.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
