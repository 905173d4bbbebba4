#!/usr/bin/env python3
"""NIXL's Python API as the anchor across two GPUs: runs the team's nixl_anchor.py
unchanged, with its initiator's buffers on cuda:0 and its target process's on cuda:1.

  nixl_anchor_2gpu.py ANCHOR.py [nixl_anchor.py arguments...]

The anchor picks a buffer's device with its `device(mem)` function. Its target runs in a
spawned process, which re-runs this file's top level before it unpickles the target, so
patching here reaches both processes.
"""
import importlib.util, multiprocessing as mp, os, sys

path = os.environ.get("NIXL_ANCHOR") or sys.argv[1]
spec = importlib.util.spec_from_file_location("nixl_anchor", path)
anchor = importlib.util.module_from_spec(spec)
sys.modules["nixl_anchor"] = anchor
spec.loader.exec_module(anchor)
anchor.device = lambda mem: ("cuda:1" if mp.parent_process() else "cuda:0") if mem == "vram" else "cpu"

if __name__ == "__main__":
    os.environ["NIXL_ANCHOR"] = path
    sys.argv = [path] + sys.argv[2:]
    anchor.main()
