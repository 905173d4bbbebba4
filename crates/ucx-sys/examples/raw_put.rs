//! UCX with nothing of pdserve around it: the reference that `pdserve kvbench --backend
//! ucx` is held to. Two processes (this program starts its own target), host memory,
//! one thread each; every write is timed from its post to its local completion, as
//! kvbench times ours.
//!
//!   cargo run --release -p ucx-sys --example raw_put -- [--sizes 4096,65536,1048576] [--iters 300]
//!
//! Two protocols per size:
//! - `put`: `ucp_put_nbx` then `ucp_ep_flush_nbx` (a raw put, no notification);
//! - `put+notify`: as pdserve's ucx backend writes: put, `ucp_worker_fence`, an 8-byte
//!   active message with the tag, flush. The target counts the notifications.
//!
//! UCX comes from `$PDSERVE_UCX_LIB_DIR`, else the folder the crate was built against.
use std::ffi::c_void;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use ucx_sys as sys;

const AM_ID: u32 = 0x7064;

fn check(op: &str, s: sys::ucs_status_t) {
    assert!(s == sys::UCS_OK, "{op} failed: status {s}");
}

/// Whether a request pointer UCX returned is an error status in disguise.
fn is_err(req: *mut c_void) -> bool {
    (req as usize) >= (sys::UCS_ERR_LAST as isize as usize)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

struct Ucx {
    lib: sys::Ucp,
    ctx: sys::ucp_context_h,
    worker: sys::ucp_worker_h,
}

impl Ucx {
    fn new() -> Ucx {
        let dir = std::env::var_os("PDSERVE_UCX_LIB_DIR").map(std::path::PathBuf::from);
        let lib = sys::Ucp::load(dir.as_deref()).expect("load UCX");
        let params = sys::ucp_params_t {
            field_mask: sys::UCP_PARAM_FIELD_FEATURES as u64,
            features: (sys::UCP_FEATURE_RMA | sys::UCP_FEATURE_AM) as u64,
            ..Default::default()
        };
        let mut ctx = ptr::null_mut();
        // SAFETY: params set for the fields its mask names; NULL config reads UCX_*.
        check("ucp_init", unsafe {
            lib.ucp_init_version(sys::UCP_API_MAJOR, sys::UCP_API_MINOR, &params, ptr::null(), &mut ctx)
        });
        let wp = sys::ucp_worker_params_t {
            field_mask: sys::UCP_WORKER_PARAM_FIELD_THREAD_MODE as u64,
            thread_mode: sys::UCS_THREAD_MODE_SINGLE,
            ..Default::default()
        };
        let mut worker = ptr::null_mut();
        // SAFETY: a live context.
        check("ucp_worker_create", unsafe { lib.ucp_worker_create(ctx, &wp, &mut worker) });
        Ucx { lib, ctx, worker }
    }

    /// Maps `buf` for RMA; returns the handle and its packed remote key.
    fn map(&self, buf: &mut [u8]) -> (sys::ucp_mem_h, Vec<u8>) {
        let p = sys::ucp_mem_map_params_t {
            field_mask: (sys::UCP_MEM_MAP_PARAM_FIELD_ADDRESS
                | sys::UCP_MEM_MAP_PARAM_FIELD_LENGTH
                | sys::UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE) as u64,
            address: buf.as_mut_ptr() as *mut c_void,
            length: buf.len(),
            memory_type: sys::UCS_MEMORY_TYPE_HOST,
            ..Default::default()
        };
        let mut memh = ptr::null_mut();
        // SAFETY: `buf` outlives the mapping (both live until the process exits).
        check("ucp_mem_map", unsafe { self.lib.ucp_mem_map(self.ctx, &p, &mut memh) });
        let (mut kb, mut kn) = (ptr::null_mut(), 0usize);
        // SAFETY: a handle of this context; the packed key is copied, then released.
        check("ucp_rkey_pack", unsafe { self.lib.ucp_rkey_pack(self.ctx, memh, &mut kb, &mut kn) });
        // SAFETY: UCX returned `kn` bytes at `kb`.
        let key = unsafe { std::slice::from_raw_parts(kb as *const u8, kn) }.to_vec();
        // SAFETY: releasing UCX's buffer once.
        unsafe { self.lib.ucp_rkey_buffer_release(kb) };
        (memh, key)
    }

    fn address(&self) -> Vec<u8> {
        let (mut a, mut n) = (ptr::null_mut(), 0usize);
        // SAFETY: a live worker; the address is copied, then released.
        check("ucp_worker_get_address", unsafe {
            self.lib.ucp_worker_get_address(self.worker, &mut a, &mut n)
        });
        // SAFETY: UCX returned `n` bytes at `a`.
        let v = unsafe { std::slice::from_raw_parts(a as *const u8, n) }.to_vec();
        // SAFETY: releasing UCX's address once.
        unsafe { self.lib.ucp_worker_release_address(self.worker, a) };
        v
    }

    /// Lets go of a request whose completion the flush below will show (checks that the
    /// call did not fail outright).
    fn release(&self, op: &str, req: *mut c_void) {
        if !req.is_null() {
            assert!(!is_err(req), "{op} failed");
            // SAFETY: a live request of this worker, freed once; UCX completes it later.
            unsafe { self.lib.ucp_request_free(req) };
        }
    }

    /// Progresses until `req` (a request of this worker, or an immediate status) is done.
    fn wait(&self, req: *mut c_void) {
        if req.is_null() {
            return;
        }
        assert!(!is_err(req), "request failed");
        // SAFETY: a live request of this worker, freed once when done.
        unsafe {
            while self.lib.ucp_request_check_status(req) == sys::UCS_INPROGRESS {
                self.lib.ucp_worker_progress(self.worker);
            }
            self.lib.ucp_request_free(req);
        }
    }
}

static NOTIFIED: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" fn on_am(
    _arg: *mut c_void,
    _header: *const c_void,
    _header_length: usize,
    _data: *mut c_void,
    _length: usize,
    _param: *const sys::ucp_am_recv_param_t,
) -> sys::ucs_status_t {
    NOTIFIED.fetch_add(1, Ordering::Relaxed);
    sys::UCS_OK
}

/// The target: one buffer of `len` bytes; prints its worker address, the buffer's
/// address and key, then progresses until its stdin closes.
fn target(len: usize) {
    let u = Ucx::new();
    let am = sys::ucp_am_handler_param_t {
        field_mask: (sys::UCP_AM_HANDLER_PARAM_FIELD_ID | sys::UCP_AM_HANDLER_PARAM_FIELD_CB) as u64,
        id: AM_ID,
        cb: Some(on_am),
        ..Default::default()
    };
    // SAFETY: a live worker; the callback touches only a static counter.
    check("ucp_worker_set_am_recv_handler", unsafe {
        u.lib.ucp_worker_set_am_recv_handler(u.worker, &am)
    });
    let mut buf = vec![0u8; len];
    let (_memh, key) = u.map(&mut buf);
    println!("{}\n{}\n{}", hex(&u.address()), buf.as_ptr() as u64, hex(&key));
    std::io::stdout().flush().unwrap();
    // The initiator sends the number of notifications it posted, then closes stdin.
    // They may still be in flight then (a put completes before the target has run its
    // handler): keep progressing until all arrived, for up to 5 s.
    let expected = std::sync::Arc::new(AtomicU64::new(u64::MAX));
    let e = expected.clone();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::stdin().read_to_string(&mut text);
        e.store(text.trim().parse().unwrap_or(0), Ordering::Relaxed);
    });
    let mut since = None;
    loop {
        let want = expected.load(Ordering::Relaxed);
        if want != u64::MAX {
            let t = *since.get_or_insert_with(Instant::now);
            if NOTIFIED.load(Ordering::Relaxed) >= want || t.elapsed().as_secs() >= 5 {
                break;
            }
        }
        // SAFETY: our worker, on the thread that created it.
        unsafe { u.lib.ucp_worker_progress(u.worker) };
    }
    let (got, want) = (NOTIFIED.load(Ordering::Relaxed), expected.load(Ordering::Relaxed));
    eprintln!("raw_put target: {got} of {want} notifications arrived");
    // Exit without tearing UCX down: the process ends here.
    std::process::exit(if got == want { 0 } else { 1 });
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
            .unwrap_or_else(|| default.to_string())
    };
    let sizes: Vec<usize> = opt("--sizes", "4096,65536,1048576")
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    let iters: usize = opt("--iters", "300").parse().unwrap();
    let gap = std::time::Duration::from_micros(opt("--gap-us", "0").parse().unwrap());
    let max = *sizes.iter().max().unwrap();
    if args.get(1).map(String::as_str) == Some("target") {
        return target(opt("--len", "0").parse().unwrap());
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["target", "--len", &max.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the target");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut line = || lines.next().unwrap().unwrap();
    let (addr, raddr, rkey) = (unhex(&line()), line().parse::<u64>().unwrap(), unhex(&line()));

    let u = Ucx::new();
    let mut src = vec![7u8; max];
    let (memh, _) = u.map(&mut src);
    let ep_params = sys::ucp_ep_params_t {
        field_mask: sys::UCP_EP_PARAM_FIELD_REMOTE_ADDRESS as u64,
        address: addr.as_ptr() as *const sys::ucp_address_t,
        ..Default::default()
    };
    let mut ep = ptr::null_mut();
    // SAFETY: `addr` is the target's worker address as its UCX exported it.
    check("ucp_ep_create", unsafe { u.lib.ucp_ep_create(u.worker, &ep_params, &mut ep) });
    let mut key = ptr::null_mut();
    // SAFETY: a key packed by the target's context for the buffer at `raddr`.
    check("ucp_ep_rkey_unpack", unsafe {
        u.lib.ucp_ep_rkey_unpack(ep, rkey.as_ptr() as *const c_void, &mut key)
    });

    println!("| size | put µs | put+notify µs |\n|---|---|---|");
    let mut tag = 0u64;
    for &n in &sizes {
        let mut cells = Vec::new();
        for notify in [false, true] {
            let mut times = Vec::with_capacity(iters);
            for i in 0..iters + 20 {
                let put = sys::ucp_request_param_t {
                    op_attr_mask: sys::UCP_OP_ATTR_FIELD_MEMORY_TYPE | sys::UCP_OP_ATTR_FIELD_MEMH,
                    memory_type: sys::UCS_MEMORY_TYPE_HOST,
                    memh,
                    ..Default::default()
                };
                let t = Instant::now();
                // SAFETY: `src` and `raddr` are mapped ranges of at least `n` bytes.
                unsafe {
                    u.release("put", u.lib.ucp_put_nbx(ep, src.as_ptr() as *const c_void, n, raddr, key, &put));
                    if notify {
                        check("ucp_worker_fence", u.lib.ucp_worker_fence(u.worker));
                        tag += 1;
                        let am = sys::ucp_request_param_t {
                            op_attr_mask: sys::UCP_OP_ATTR_FIELD_FLAGS,
                            flags: sys::UCP_AM_SEND_FLAG_COPY_HEADER,
                            ..Default::default()
                        };
                        let r = u
                            .lib
                            .ucp_am_send_nbx(ep, AM_ID, &tag as *const u64 as *const c_void, 8, ptr::null(), 0, &am);
                        u.release("active message", r);
                    }
                    u.wait(u.lib.ucp_ep_flush_nbx(ep, &sys::ucp_request_param_t::default()));
                }
                if i >= 20 {
                    times.push(t.elapsed().as_secs_f64() * 1e6);
                }
                if !gap.is_zero() {
                    std::thread::sleep(gap);
                }
            }
            cells.push(format!("{:.2}", median(times)));
        }
        println!("| {n} | {} | {} |", cells[0], cells[1]);
    }
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{tag}").unwrap();
    drop(stdin);
    let status = child.wait().unwrap();
    assert!(status.success(), "the target did not see every notification");
}
