"""``python -m torchrec_cce.ops``: build the fused remap op now (the install step calls this)."""
import sys

from torchrec_cce.ops import build_directory, load

if __name__ == "__main__":
    ok = load(verbose="-v" in sys.argv)
    print(f"torchrec_cce fused remap op: {'built' if ok else 'NOT available'} ({build_directory()})")
    sys.exit(0 if ok else 1)
