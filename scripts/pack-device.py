#!/usr/bin/env python3
"""Packs what a GPU device run needs into .carry/ (git-ignored, carried by the device
tool): the NIXL wheel's libraries pruned to what libnixl_capi.so, the UCX plugin and the
Python bindings load (transitively), the libucx-cu13 wheel's shared libraries, the CUDA
build of pdserve, and NIXL's Python anchor. Keeps the bundle under the 64 MiB limit.

  python3 scripts/pack-device.py --nixl-wheel W.whl --ucx-dir .deps/ucx --bin target/release/pdserve --out .carry
"""
import argparse, os, shutil, subprocess, tarfile, tempfile, zipfile

def needed(path):
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True).stdout
    return [l.split("[")[1].split("]")[0] for l in out.splitlines() if "(NEEDED)" in l]

def closure(roots, search_dirs):
    index = {}
    for d in search_dirs:
        for f in os.listdir(d):
            index.setdefault(f, os.path.join(d, f))
    keep, todo = set(), list(roots)
    while todo:
        p = todo.pop()
        if p in keep:
            continue
        keep.add(p)
        for n in needed(p):
            if n in index:
                todo.append(index[n])
    return keep

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nixl-wheel", required=True)
    ap.add_argument("--ucx-dir", required=True)
    ap.add_argument("--bin", required=True, help="comma-separated binaries")
    ap.add_argument("--anchor", default="../shared/tools/nixl_anchor.py")
    ap.add_argument("--out", default=".carry")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    tmp = tempfile.mkdtemp()
    with zipfile.ZipFile(a.nixl_wheel) as z:
        z.extractall(tmp)
    core = os.path.join(tmp, ".nixl_cu13.mesonpy.libs")
    libs = os.path.join(tmp, "nixl_cu13.libs")
    roots = [os.path.join(core, f) for f in os.listdir(core) if ".so" in f]
    roots.append(os.path.join(core, "plugins", "libplugin_UCX.so"))
    pkg = os.path.join(tmp, "nixl_cu13")
    roots += [os.path.join(pkg, f) for f in os.listdir(pkg) if f.endswith(".so")]
    # UCX loads its transport modules from <libucs dir>/ucx at run time.
    ucx_mods = os.path.join(libs, "ucx")
    roots += [os.path.join(ucx_mods, f) for f in os.listdir(ucx_mods) if ".so" in f and "perftest" not in f]
    keep = closure(roots, [core, libs, ucx_mods])
    nixl_tar = os.path.join(a.out, "nixl.tar.xz")
    with tarfile.open(nixl_tar, "w:xz", preset=6) as t:
        for p in sorted(keep):
            t.add(p, arcname=os.path.relpath(p, tmp))
        for f in os.listdir(pkg):
            if f.endswith(".py"):
                t.add(os.path.join(pkg, f), arcname=os.path.join("nixl_cu13", f))
    ucx_tar = os.path.join(a.out, "ucx.tar.xz")
    # The wheel's layout is kept: its CUDA modules find the bundled libcudart through
    # an RPATH relative to themselves (../../../libucx_cu13.libs).
    lib = os.path.join(a.ucx_dir, "libucx", "lib")
    bundled = os.path.join(a.ucx_dir, "libucx_cu13.libs")
    with tarfile.open(ucx_tar, "w:xz", preset=6) as t:
        for d in [lib, os.path.join(lib, "ucx"), bundled]:
            for f in os.listdir(d):
                p = os.path.join(d, f)
                # Only the versioned names the loader asks for (.so.0), and bundled libs.
                if os.path.isfile(p) and (f.endswith(".so.0") or d == bundled) and "perftest" not in f and "gomp" not in f:
                    t.add(p, arcname=os.path.relpath(p, a.ucx_dir))
    for b in a.bin.split(","):
        name = os.path.basename(b)
        subprocess.run(["strip", "-o", os.path.join(tmp, name), b], check=True)
        with open(os.path.join(a.out, name + ".xz"), "wb") as f:
            subprocess.run(["xz", "-6", "-T0", "-c", os.path.join(tmp, name)], stdout=f, check=True)
    if os.path.exists(a.anchor):
        shutil.copy(a.anchor, os.path.join(a.out, "nixl_anchor.py"))
    shutil.rmtree(tmp)
    total = sum(os.path.getsize(os.path.join(a.out, f)) for f in os.listdir(a.out))
    for f in sorted(os.listdir(a.out)):
        print(f"  {f}: {os.path.getsize(os.path.join(a.out, f)) / 2**20:.1f} MiB")
    print(f"  total {total / 2**20:.1f} MiB")

if __name__ == "__main__":
    main()
