//! The UCX backend: UCP directly, through our run-time loaded `ucx-sys`.
//!
//! A write is `ucp_put_nbx` per segment (local buffers pre-mapped, so no per-call
//! registration), then `ucp_ep_flush_nbx`, whose completion means the puts are in the
//! peer's memory; then one active message carries the notification (its header: the
//! tag, u64 little-endian, then the sender agent's name, at most 256 bytes; no
//! payload), and the write is complete. Not `ucp_worker_fence` between the puts and
//! the message: over transports without a native fence (TCP among them) it waits,
//! inside the call, for every operation of the worker, so one hung peer would stall
//! the driver thread and every other write (found by tests/cross_process.rs's
//! stopped target). The worker is in
//! `UCS_THREAD_MODE_SERIALIZED`: the driver thread progresses it, and a caller's thread
//! may post a small host write on it, never both at once (the driver's lock).
use std::collections::HashMap;
use std::ffi::{CStr, c_void};
use std::path::PathBuf;
use std::ptr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI8, Ordering};
use std::sync::mpsc::SyncSender;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use ucx_sys as sys;

use crate::auth::MAX_NAME_LEN;
use crate::driver::{Driver, Wait, Work};
use crate::error::{Result, TransferError};
use crate::metadata::Metadata;
use crate::notify::NotifyHub;
use crate::{BackendKind, MemKind, Memory, Resolved, TransferConfig};

/// The active-message id that carries write notifications.
const NOTIFY_AM_ID: u32 = 0x7064;
/// The notification header: tag, then the sender's name.
const TAG_LEN: usize = 8;
const SETUP_DEADLINE: Duration = Duration::from_secs(10);
/// The longest an endpoint's force-close is progressed.
const CLOSE_LIMIT: Duration = Duration::from_secs(2);

fn backend_err(op: &'static str, detail: impl Into<String>) -> TransferError {
    TransferError::Backend {
        backend: BackendKind::Ucx,
        op,
        detail: detail.into(),
    }
}

fn mem_type(kind: MemKind) -> sys::ucs_memory_type_t {
    match kind {
        MemKind::Dram => sys::UCS_MEMORY_TYPE_HOST,
        MemKind::Vram { .. } => sys::UCS_MEMORY_TYPE_CUDA,
    }
}

enum Cmd {
    Register {
        id: u32,
        addr: usize,
        len: usize,
        kind: MemKind,
        reply: SyncSender<Result<Vec<u8>>>,
    },
    /// Answers once the region is unmapped (writes that use it abandoned first):
    /// false if it could not be, and its memory must not be freed.
    Deregister {
        id: u32,
        reply: SyncSender<bool>,
    },
    Connect {
        addr: Vec<u8>,
        rkeys: Vec<(u32, Vec<u8>)>,
        /// Closes the endpoint if its lease is dropped unread.
        undo: Option<crate::driver::Handle<Cmd>>,
        reply: oneshot::Sender<Result<crate::driver::Lease<Cmd>>>,
    },
    Disconnect {
        ep: u64,
    },
    Prepare {
        ep: u64,
        segs: Vec<Resolved>,
        reply: oneshot::Sender<Result<u64>>,
    },
    Release {
        id: u64,
    },
    Post {
        id: u64,
        tag: u64,
        deadline: Instant,
        reply: oneshot::Sender<Result<()>>,
    },
}

pub(crate) struct Ucx {
    driver: Driver<UcxWork>,
    worker_addr: Vec<u8>,
    info: String,
}

/// Where `libucp.so` is looked for, in order: `explicit` (config `ucx_lib_dir`), else
/// `$PDSERVE_UCX_LIB_DIR`, else the installed folder and then the UCX the build used.
pub fn library_dirs(explicit: Option<&std::path::PathBuf>) -> Vec<std::path::PathBuf> {
    crate::config::lib_dir(explicit, "PDSERVE_UCX_LIB_DIR", "/usr/lib/pdserve/ucx", Some(sys::DEFAULT_LIBDIR))
}

impl Ucx {
    pub(crate) fn start(cfg: &TransferConfig, name: &str, notify: Arc<NotifyHub>) -> Result<Ucx> {
        let dirs = library_dirs(cfg.ucx_lib_dir.as_ref());
        let peer_errors = cfg.ucx_peer_error_handling;
        let (info_tx, info_rx) = std::sync::mpsc::sync_channel(1);
        let hub = notify.clone();
        let name = name.to_string();
        let driver = Driver::spawn(
            BackendKind::Ucx,
            move || {
                let w = UcxWork::new(&dirs, peer_errors, hub, name)?;
                let _ = info_tx.send((w.worker_addr.clone(), w.describe()));
                Ok(w)
            },
            notify,
            cfg.hot_spin(),
        )?;
        let (worker_addr, info) = info_rx.recv().map_err(|_| TransferError::Closed)?;
        Ok(Ucx { driver, worker_addr, info })
    }

    pub(crate) fn info(&self) -> String {
        self.info.clone()
    }

    pub(crate) fn register(&self, id: u32, mem: &Memory) -> Result<Vec<u8>> {
        let (addr, len, kind) = (mem.addr(), mem.len(), mem.kind());
        self.driver.call(SETUP_DEADLINE, |reply| Cmd::Register {
            id,
            addr,
            len,
            kind,
            reply,
        })?
    }

    /// True once the region is unmapped; false when its memory must be kept (a close
    /// that never completed, or no answer in time).
    pub(crate) fn deregister(&self, id: u32) -> bool {
        self.driver
            .call(SETUP_DEADLINE, |reply| Cmd::Deregister { id, reply })
            .unwrap_or(false)
    }

    pub(crate) fn conn_info(&self) -> Vec<u8> {
        self.worker_addr.clone()
    }

    pub(crate) async fn connect(&self, md: &Metadata) -> Result<u64> {
        if md.conn.is_empty() {
            return Err(TransferError::BadMetadata("no UCX worker address".into()));
        }
        let rkeys = md.regions.iter().map(|r| (r.id, r.key.clone())).collect();
        let addr = md.conn.clone();
        self.driver
            .call_leased(SETUP_DEADLINE, |undo, reply| Cmd::Connect { addr, rkeys, undo, reply })
            .await
    }

    pub(crate) fn disconnect(&self, ep: u64) {
        let _ = self.driver.send(Cmd::Disconnect { ep });
    }

    pub(crate) async fn prepare(&self, ep: u64, segs: &[Resolved]) -> Result<u64> {
        let segs = segs.to_vec();
        self.driver
            .call_async(SETUP_DEADLINE, |reply| Cmd::Prepare { ep, segs, reply })
            .await?
    }

    pub(crate) fn release(&self, id: u64) {
        let _ = self.driver.send(Cmd::Release { id });
    }

    pub(crate) async fn post(&self, id: u64, tag: u64, deadline: Duration, wait: Wait) -> Result<()> {
        let deadline = Instant::now() + deadline;
        self.driver.ask(wait, |reply| Cmd::Post { id, tag, deadline, reply }).await
    }

    pub(crate) fn shutdown(&self) {
        self.driver.shutdown();
    }
}

struct Region {
    memh: sys::ucp_mem_h,
    kind: MemKind,
}

struct Endpoint {
    ep: sys::ucp_ep_h,
    rkeys: HashMap<u32, sys::ucp_rkey_h>,
    /// Written by UCX's error callback (UCS_OK until the peer fails).
    status: Box<AtomicI8>,
}

struct Put {
    local: *const c_void,
    remote: u64,
    len: usize,
    rkey: sys::ucp_rkey_h,
    memh: sys::ucp_mem_h,
    mem_type: sys::ucs_memory_type_t,
}

struct Prepared {
    ep: u64,
    regions: Vec<u32>,
    puts: Vec<Put>,
}

struct Pending {
    ep: u64,
    /// The local regions the write reads (a deregistration abandons it first).
    regions: Vec<u32>,
    req: *mut c_void,
    /// The notification, sent once the flush completes.
    tag: u64,
    deadline: Instant,
    reply: oneshot::Sender<Result<()>>,
}

struct Closing {
    req: *mut c_void,
    until: Instant,
    rkeys: Vec<sys::ucp_rkey_h>,
    /// The error callback's argument, kept until the endpoint is gone.
    status: Option<Box<AtomicI8>>,
}

struct UcxWork {
    lib: sys::Ucp,
    context: sys::ucp_context_h,
    worker: sys::ucp_worker_h,
    worker_addr: Vec<u8>,
    peer_errors: bool,
    regions: HashMap<u32, Region>,
    eps: HashMap<u64, Endpoint>,
    prepared: HashMap<u64, Prepared>,
    pending: Vec<Pending>,
    /// Endpoints being force-closed: progressed until closed (or past their time).
    closing: Vec<Closing>,
    /// False once a close was given up on (see `progress_closing`).
    closes_clean: bool,
    next_id: u64,
    /// Owned here so the active-message callback's argument outlives the worker.
    hub: Arc<NotifyHub>,
    libdir: PathBuf,
    /// This agent's name, sent with every notification (at most MAX_NAME_LEN bytes:
    /// Agent::start checks).
    name: String,
}

unsafe extern "C" fn on_notify_am(
    arg: *mut c_void,
    header: *const c_void,
    header_length: usize,
    _data: *mut c_void,
    _length: usize,
    _param: *const sys::ucp_am_recv_param_t,
) -> sys::ucs_status_t {
    // A peer sends what it likes: anything but tag || name (1..=MAX_NAME_LEN bytes of
    // UTF-8) is dropped, checked before the header is read.
    if header.is_null() || arg.is_null() || !(TAG_LEN + 1..=TAG_LEN + MAX_NAME_LEN).contains(&header_length) {
        tracing::debug!(header_length, "ignoring a malformed UCX notification");
        return sys::UCS_OK;
    }
    // SAFETY: UCX passes the header it received, valid for `header_length` bytes
    // (non-null, length checked above) for the duration of this callback; the slice
    // does not outlive it.
    let bytes = unsafe { std::slice::from_raw_parts(header as *const u8, header_length) };
    let (tag, name) = bytes.split_at(TAG_LEN);
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(tag);
    let Ok(name) = std::str::from_utf8(name) else {
        tracing::debug!("ignoring a UCX notification whose sender name is not UTF-8");
        return sys::UCS_OK;
    };
    // SAFETY: `arg` is the pointer we registered with the handler: the hub, which
    // UcxWork keeps alive until after the worker (and so this callback) is gone.
    let hub = unsafe { &*(arg as *const NotifyHub) };
    hub.deliver(name, u64::from_le_bytes(t));
    sys::UCS_OK
}

unsafe extern "C" fn on_ep_error(arg: *mut c_void, _ep: sys::ucp_ep_h, status: sys::ucs_status_t) {
    // SAFETY: `arg` is the endpoint's boxed status, freed only after the endpoint closed.
    unsafe { (*(arg as *const AtomicI8)).store(status, Ordering::Release) };
}

fn is_err_ptr(p: *mut c_void) -> bool {
    (p as usize) >= (sys::UCS_ERR_LAST as isize as usize)
}

impl UcxWork {
    fn new(dirs: &[PathBuf], peer_errors: bool, hub: Arc<NotifyHub>, name: String) -> Result<UcxWork> {
        let mut errors = Vec::new();
        let mut loaded = None;
        for d in dirs {
            match sys::Ucp::load(Some(d)) {
                Ok(l) => {
                    loaded = Some((l, d.clone()));
                    break;
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        let Some((lib, libdir)) = loaded else {
            return Err(TransferError::Unavailable {
                backend: BackendKind::Ucx,
                detail: format!(
                    "{} (set PDSERVE_UCX_LIB_DIR or ucx_lib_dir, or run scripts/setup.sh)",
                    errors.join("; ")
                ),
            });
        };
        let mut w = UcxWork {
            lib,
            context: ptr::null_mut(),
            worker: ptr::null_mut(),
            worker_addr: Vec::new(),
            peer_errors,
            regions: HashMap::new(),
            eps: HashMap::new(),
            prepared: HashMap::new(),
            pending: Vec::new(),
            closing: Vec::new(),
            closes_clean: true,
            next_id: 1,
            hub,
            libdir,
            name,
        };
        w.init().inspect_err(|_| w.finish())?;
        Ok(w)
    }

    fn status_str(&self, s: sys::ucs_status_t) -> String {
        // SAFETY: ucs_status_string returns a static C string for any status.
        unsafe { CStr::from_ptr(self.lib.ucs_status_string(s)) }
            .to_string_lossy()
            .into_owned()
    }

    fn check(&self, op: &'static str, s: sys::ucs_status_t) -> Result<()> {
        if s == sys::UCS_OK {
            Ok(())
        } else {
            Err(backend_err(op, self.status_str(s)))
        }
    }

    fn init(&mut self) -> Result<()> {
        let params = sys::ucp_params_t {
            field_mask: sys::UCP_PARAM_FIELD_FEATURES as u64,
            features: (sys::UCP_FEATURE_RMA | sys::UCP_FEATURE_AM) as u64,
            ..Default::default()
        };
        // SAFETY: params is initialised for the fields its mask names; config NULL
        // reads UCX_* from the environment; the context pointer is written on success.
        let s = unsafe {
            self.lib
                .ucp_init_version(sys::UCP_API_MAJOR, sys::UCP_API_MINOR, &params, ptr::null(), &mut self.context)
        };
        self.check("ucp_init", s).map_err(|e| TransferError::Unavailable {
            backend: BackendKind::Ucx,
            detail: e.to_string(),
        })?;
        let wparams = sys::ucp_worker_params_t {
            field_mask: sys::UCP_WORKER_PARAM_FIELD_THREAD_MODE as u64,
            thread_mode: sys::UCS_THREAD_MODE_SERIALIZED,
            ..Default::default()
        };
        // SAFETY: a valid context and params; the worker pointer is written on success.
        let s = unsafe { self.lib.ucp_worker_create(self.context, &wparams, &mut self.worker) };
        self.check("ucp_worker_create", s)?;
        let mut attr = sys::ucp_worker_attr_t {
            field_mask: sys::UCP_WORKER_ATTR_FIELD_MAX_AM_HEADER as u64,
            ..Default::default()
        };
        // SAFETY: a valid worker; attr asks only for the field its mask names.
        let s = unsafe { self.lib.ucp_worker_query(self.worker, &mut attr) };
        self.check("ucp_worker_query", s)?;
        // The notification header carries the tag and our name.
        if attr.max_am_header < TAG_LEN + self.name.len() {
            return Err(TransferError::Unavailable {
                backend: BackendKind::Ucx,
                detail: format!(
                    "UCX active-message headers are limited to {} bytes here, the notification needs {}",
                    attr.max_am_header,
                    TAG_LEN + self.name.len()
                ),
            });
        }
        let am = sys::ucp_am_handler_param_t {
            field_mask: (sys::UCP_AM_HANDLER_PARAM_FIELD_ID | sys::UCP_AM_HANDLER_PARAM_FIELD_CB | sys::UCP_AM_HANDLER_PARAM_FIELD_ARG)
                as u64,
            id: NOTIFY_AM_ID,
            cb: Some(on_notify_am),
            arg: Arc::as_ptr(&self.hub) as *mut c_void,
            ..Default::default()
        };
        // SAFETY: the callback's argument (the hub) lives as long as this struct,
        // which destroys the worker before dropping it.
        let s = unsafe { self.lib.ucp_worker_set_am_recv_handler(self.worker, &am) };
        self.check("ucp_worker_set_am_recv_handler", s)?;
        let mut addr: *mut sys::ucp_address_t = ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: a valid worker; UCX allocates the address, released below after copying.
        let s = unsafe { self.lib.ucp_worker_get_address(self.worker, &mut addr, &mut len) };
        self.check("ucp_worker_get_address", s)?;
        // SAFETY: UCX returned `len` bytes at `addr`.
        self.worker_addr = unsafe { std::slice::from_raw_parts(addr as *const u8, len) }.to_vec();
        // SAFETY: releasing the address UCX gave us, once.
        unsafe { self.lib.ucp_worker_release_address(self.worker, addr) };
        Ok(())
    }

    fn describe(&self) -> String {
        let (a, b, c) = self.lib.version();
        format!("UCX {a}.{b}.{c} from {}", self.libdir.display())
    }

    fn register(&mut self, id: u32, addr: usize, len: usize, kind: MemKind) -> Result<Vec<u8>> {
        // GPU pointers are used from this thread: bind the device's context to it.
        #[cfg(feature = "cuda")]
        if let MemKind::Vram { device } = kind {
            crate::cuda::bind_thread(device)?;
        }
        let params = sys::ucp_mem_map_params_t {
            field_mask: (sys::UCP_MEM_MAP_PARAM_FIELD_ADDRESS
                | sys::UCP_MEM_MAP_PARAM_FIELD_LENGTH
                | sys::UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE) as u64,
            address: addr as *mut c_void,
            length: len,
            memory_type: mem_type(kind),
            ..Default::default()
        };
        let mut memh: sys::ucp_mem_h = ptr::null_mut();
        // SAFETY: the caller (Agent::register, through Memory's contract) guarantees the
        // range is a live allocation of this kind until deregistration.
        let s = unsafe { self.lib.ucp_mem_map(self.context, &params, &mut memh) };
        self.check("ucp_mem_map", s)?;
        let mut buf: *mut c_void = ptr::null_mut();
        let mut size = 0usize;
        // SAFETY: memh was just mapped on this context.
        let s = unsafe { self.lib.ucp_rkey_pack(self.context, memh, &mut buf, &mut size) };
        if s != sys::UCS_OK {
            // SAFETY: unmapping the handle we mapped above.
            unsafe { self.lib.ucp_mem_unmap(self.context, memh) };
            return Err(backend_err("ucp_rkey_pack", self.status_str(s)));
        }
        // SAFETY: UCX returned `size` bytes at `buf`, released right after the copy.
        let key = unsafe { std::slice::from_raw_parts(buf as *const u8, size) }.to_vec();
        // SAFETY: releasing the buffer ucp_rkey_pack allocated, once.
        unsafe { self.lib.ucp_rkey_buffer_release(buf) };
        self.regions.insert(id, Region { memh, kind });
        Ok(key)
    }

    /// Unmaps a region; false (and the mapping kept) when an endpoint that may still
    /// read it could not be closed: its memory must then not be freed.
    fn deregister(&mut self, id: u32) -> bool {
        // A write in flight that reads this region is abandoned and its endpoint closed
        // (waited for: the memory may be freed once this returns) before the mapping goes.
        let busy: Vec<u64> = self.pending.iter().filter(|p| p.regions.contains(&id)).map(|p| p.ep).collect();
        for ep in busy {
            self.abandon_ep(ep, &TransferError::Invalid(format!("local region {id} deregistered")), false);
        }
        // Every endpoint closing (these, and any closed before with puts that may read
        // this region) is waited for, together, under one bound.
        let clean = self.wait_closes();
        // Prepared writes that read from this region would use a dead handle.
        self.prepared.retain(|_, p| !p.regions.contains(&id));
        if !clean {
            tracing::error!(
                region = id,
                "a ucx endpoint that may read this region did not close: the region stays mapped"
            );
            self.regions.remove(&id);
            return false;
        }
        if let Some(r) = self.regions.remove(&id) {
            // SAFETY: the handle came from ucp_mem_map on this context; no prepared
            // write refers to it any more.
            let s = unsafe { self.lib.ucp_mem_unmap(self.context, r.memh) };
            if s != sys::UCS_OK {
                tracing::warn!(region = id, status = %self.status_str(s), "ucp_mem_unmap failed");
            }
        }
        true
    }

    fn connect(&mut self, addr: &[u8], rkeys: &[(u32, Vec<u8>)]) -> Result<u64> {
        let status = Box::new(AtomicI8::new(sys::UCS_OK));
        let mut mask = sys::UCP_EP_PARAM_FIELD_REMOTE_ADDRESS as u64;
        let mut params = sys::ucp_ep_params_t {
            address: addr.as_ptr() as *const sys::ucp_address_t,
            ..Default::default()
        };
        if self.peer_errors {
            mask |= (sys::UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | sys::UCP_EP_PARAM_FIELD_ERR_HANDLER) as u64;
            params.err_mode = sys::UCP_ERR_HANDLING_MODE_PEER;
            params.err_handler = sys::ucp_err_handler_t {
                cb: Some(on_ep_error),
                arg: &*status as *const AtomicI8 as *mut c_void,
            };
        }
        params.field_mask = mask;
        let mut ep: sys::ucp_ep_h = ptr::null_mut();
        // SAFETY: `addr` holds a worker address as the peer's UCX exported it (UCX
        // validates its contents); the error callback's argument is boxed and kept
        // until the endpoint is closed.
        let s = unsafe { self.lib.ucp_ep_create(self.worker, &params, &mut ep) };
        self.check("ucp_ep_create", s)
            .map_err(|e| TransferError::BadMetadata(e.to_string()))?;
        let id = self.next_id;
        self.next_id += 1;
        let mut endpoint = Endpoint {
            ep,
            rkeys: HashMap::new(),
            status,
        };
        for (region, key) in rkeys {
            if key.is_empty() {
                self.close_ep(endpoint, true);
                return Err(TransferError::BadMetadata(format!("region {region} has no UCX rkey")));
            }
            let mut rkey: sys::ucp_rkey_h = ptr::null_mut();
            // SAFETY: `key` is a packed rkey buffer from the peer; UCX checks it.
            let s = unsafe { self.lib.ucp_ep_rkey_unpack(ep, key.as_ptr() as *const c_void, &mut rkey) };
            if s != sys::UCS_OK {
                let detail = format!("rkey of region {region} does not unpack: {}", self.status_str(s));
                self.close_ep(endpoint, true);
                return Err(TransferError::BadMetadata(detail));
            }
            endpoint.rkeys.insert(*region, rkey);
        }
        self.eps.insert(id, endpoint);
        Ok(id)
    }

    /// Force-closes an endpoint, progressed in the background ([`UcxWork::progress`]);
    /// `wait`: until it is closed (at most [`CLOSE_LIMIT`]). Its remote keys are
    /// destroyed only once the close completed (UCX: not before every operation using
    /// them is done); a close that never completes leaks them and its error callback's
    /// argument rather than free what UCX may still use.
    fn close_ep(&mut self, endpoint: Endpoint, wait: bool) {
        let params = sys::ucp_request_param_t {
            op_attr_mask: sys::UCP_OP_ATTR_FIELD_FLAGS,
            flags: sys::UCP_EP_CLOSE_FLAG_FORCE,
            ..Default::default()
        };
        // SAFETY: a live endpoint, closed once.
        let req = unsafe { self.lib.ucp_ep_close_nbx(endpoint.ep, &params) };
        self.closing.push(Closing {
            req: if is_err_ptr(req) { ptr::null_mut() } else { req },
            until: Instant::now() + CLOSE_LIMIT,
            rkeys: endpoint.rkeys.into_values().collect(),
            status: Some(endpoint.status),
        });
        if wait {
            self.wait_closes();
        }
    }

    /// Progresses every background close until all are done or past their time.
    fn wait_closes(&mut self) -> bool {
        while !self.closing.is_empty() {
            // SAFETY: our worker, on its thread.
            unsafe { self.lib.ucp_worker_progress(self.worker) };
            self.progress_closing();
        }
        self.closes_clean
    }

    /// Abandons every write in flight on an endpoint (each answered
    /// [`TransferError::Abandoned`]) and force-closes it: no new byte leaves, and
    /// writes prepared on it fail from now on (its peer must connect again).
    fn abandon_ep(&mut self, ep: u64, cause: &TransferError, wait: bool) {
        let (gone, keep): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut self.pending).into_iter().partition(|p| p.ep == ep);
        self.pending = keep;
        for p in gone {
            // SAFETY: cancelling and freeing our own in-flight request, once.
            unsafe {
                self.lib.ucp_request_cancel(self.worker, p.req);
                self.lib.ucp_request_free(p.req);
            }
            let _ = p.reply.send(Err(TransferError::abandoned(BackendKind::Ucx, cause)));
        }
        self.prepared.retain(|_, p| p.ep != ep);
        if let Some(e) = self.eps.remove(&ep) {
            tracing::warn!(endpoint = ep, %cause, "ucx write abandoned: endpoint force-closed");
            self.close_ep(e, wait);
        }
    }

    /// Progresses background closes: a completed one frees its request and destroys
    /// its keys; one past its time is given up, leaking what UCX may still use (and
    /// marking closes unclean: a deregistration then keeps its memory).
    fn progress_closing(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.closing.len() {
            let c = &self.closing[i];
            // SAFETY: a live close request of this worker (null: closed at once).
            let done = c.req.is_null() || unsafe { self.lib.ucp_request_check_status(c.req) } != sys::UCS_INPROGRESS;
            if !done && now < c.until {
                i += 1;
                continue;
            }
            let mut c = self.closing.swap_remove(i);
            if !c.req.is_null() {
                // SAFETY: freeing the request once; UCX releases one still in progress
                // when it completes.
                unsafe { self.lib.ucp_request_free(c.req) };
            }
            if done {
                for rkey in c.rkeys.drain(..) {
                    // SAFETY: unpacked on the endpoint now closed; destroyed once.
                    unsafe { self.lib.ucp_rkey_destroy(rkey) };
                }
            } else {
                tracing::warn!("a ucx endpoint did not close within {CLOSE_LIMIT:?}: its keys are leaked");
                self.closes_clean = false;
                std::mem::forget(c.status.take());
                c.rkeys.clear();
            }
        }
    }

    fn prepare(&mut self, ep_id: u64, segs: &[Resolved]) -> Result<u64> {
        let ep = self
            .eps
            .get(&ep_id)
            .ok_or_else(|| TransferError::UnknownPeer(format!("ucx endpoint #{ep_id}")))?;
        let mut regions: Vec<u32> = Vec::new();
        let mut puts = Vec::with_capacity(segs.len());
        for s in segs {
            let region = self.regions.get(&s.local).ok_or(TransferError::UnknownLocalRegion(s.local))?;
            let rkey = *ep.rkeys.get(&s.remote).ok_or_else(|| TransferError::UnknownRemoteRegion {
                peer: format!("ucx endpoint #{ep_id}"),
                region: s.remote,
            })?;
            if !regions.contains(&s.local) {
                regions.push(s.local);
            }
            puts.push(Put {
                local: s.local_addr as *const c_void,
                remote: s.remote_addr,
                len: s.len as usize,
                rkey,
                memh: region.memh,
                mem_type: mem_type(region.kind),
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        self.prepared.insert(id, Prepared { ep: ep_id, regions, puts });
        Ok(id)
    }

    fn post(&mut self, id: u64, tag: u64, deadline: Instant, reply: oneshot::Sender<Result<()>>) {
        let Some(p) = self.prepared.get(&id) else {
            let _ = reply.send(Err(TransferError::Invalid(
                "prepared write was invalidated (peer disconnected or region deregistered)".into(),
            )));
            return;
        };
        let (ep, regions) = (p.ep, p.regions.clone());
        match self.start_write(id) {
            Ok(None) => {
                let r = self.notify(ep, tag);
                if let Err(e) = &r {
                    self.abandon_ep(ep, e, false);
                }
                let _ = reply.send(r);
            }
            Ok(Some(req)) => self.pending.push(Pending {
                ep,
                regions,
                req,
                tag,
                deadline,
                reply,
            }),
            Err(Started::Not(e)) => {
                let _ = reply.send(Err(e));
            }
            Err(Started::Partly(e)) => {
                let _ = reply.send(Err(TransferError::abandoned(BackendKind::Ucx, &e)));
                self.abandon_ep(ep, &e, false);
            }
        }
    }

    /// Posts the puts and the flush; returns the flush request if it did not complete
    /// at once. The notification goes once the flush completes ([`UcxWork::notify`]).
    fn start_write(&mut self, id: u64) -> std::result::Result<Option<*mut c_void>, Started> {
        let p = self.prepared.get(&id).ok_or_else(|| {
            Started::Not(TransferError::Invalid(
                "prepared write was invalidated (peer disconnected or region deregistered)".into(),
            ))
        })?;
        let ep = self
            .eps
            .get(&p.ep)
            .ok_or_else(|| Started::Not(TransferError::UnknownPeer(format!("ucx endpoint #{}", p.ep))))?;
        let failed = ep.status.load(Ordering::Acquire);
        if failed != sys::UCS_OK {
            return Err(Started::Not(TransferError::PeerLost {
                peer: format!("ucx endpoint #{}", p.ep),
                detail: self.status_str(failed),
            }));
        }
        // From the first put on, a failure leaves bytes that may still land.
        for put in &p.puts {
            let param = sys::ucp_request_param_t {
                op_attr_mask: sys::UCP_OP_ATTR_FIELD_MEMORY_TYPE | sys::UCP_OP_ATTR_FIELD_MEMH,
                memory_type: put.mem_type,
                memh: put.memh,
                ..Default::default()
            };
            // SAFETY: local range and memh are a live registration (prepared entries are
            // dropped when their regions are); remote address and rkey come from the
            // peer's metadata, bounds-checked in `resolve`.
            let r = unsafe { self.lib.ucp_put_nbx(ep.ep, put.local, put.len, put.remote, put.rkey, &param) };
            if is_err_ptr(r) {
                return Err(Started::Partly(backend_err(
                    "ucp_put_nbx",
                    self.status_str(r as isize as sys::ucs_status_t),
                )));
            }
            if !r.is_null() {
                // Completion is observed through the flush below.
                // SAFETY: freeing the request handle once; UCX completes it later.
                unsafe { self.lib.ucp_request_free(r) };
            }
        }
        let flush = sys::ucp_request_param_t::default();
        // SAFETY: a live endpoint.
        let r = unsafe { self.lib.ucp_ep_flush_nbx(ep.ep, &flush) };
        if is_err_ptr(r) {
            return Err(Started::Partly(TransferError::PeerLost {
                peer: format!("ucx endpoint #{}", p.ep),
                detail: self.status_str(r as isize as sys::ucs_status_t),
            }));
        }
        Ok(if r.is_null() { None } else { Some(r) })
    }

    /// Sends a landed write's notification on endpoint `ep_id`: one active message,
    /// its header the tag and our name, no payload.
    fn notify(&mut self, ep_id: u64, tag: u64) -> Result<()> {
        let ep = self
            .eps
            .get(&ep_id)
            .ok_or_else(|| TransferError::UnknownPeer(format!("ucx endpoint #{ep_id}")))?;
        let am = sys::ucp_request_param_t {
            op_attr_mask: sys::UCP_OP_ATTR_FIELD_FLAGS,
            flags: sys::UCP_AM_SEND_FLAG_COPY_HEADER,
            ..Default::default()
        };
        let mut header = [0u8; TAG_LEN + MAX_NAME_LEN];
        let header_len = TAG_LEN + self.name.len();
        header[..TAG_LEN].copy_from_slice(&tag.to_le_bytes());
        header[TAG_LEN..header_len].copy_from_slice(self.name.as_bytes());
        // SAFETY: the header (`header_len` bytes of a live stack array, within the
        // worker's max_am_header, checked at init) is copied by UCX before the call
        // returns (COPY_HEADER); no payload.
        let r = unsafe {
            self.lib.ucp_am_send_nbx(
                ep.ep,
                NOTIFY_AM_ID,
                header.as_ptr() as *const c_void,
                header_len,
                ptr::null(),
                0,
                &am,
            )
        };
        if is_err_ptr(r) {
            return Err(TransferError::PeerLost {
                peer: format!("ucx endpoint #{ep_id}"),
                detail: format!("notification: {}", self.status_str(r as isize as sys::ucs_status_t)),
            });
        }
        if !r.is_null() {
            // SAFETY: freeing the request handle once; UCX completes it later.
            unsafe { self.lib.ucp_request_free(r) };
        }
        Ok(())
    }
}

/// Why a write did not start: before anything was posted (nothing can land), or after.
enum Started {
    Not(TransferError),
    Partly(TransferError),
}

// SAFETY: the worker is created in UCS_THREAD_MODE_SERIALIZED, which lets any thread use
// it and its endpoints, mappings and requests one at a time; every use goes through the
// driver's lock. The raw pointers are owned here and released in `finish`.
unsafe impl Send for UcxWork {}

impl Work for UcxWork {
    type Cmd = Cmd;

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Register {
                id,
                addr,
                len,
                kind,
                reply,
            } => {
                let _ = reply.send(self.register(id, addr, len, kind));
            }
            Cmd::Deregister { id, reply } => {
                let _ = reply.send(self.deregister(id));
            }
            Cmd::Connect { addr, rkeys, undo, reply } => {
                // A caller gone (cancelled, timed out) leaves no endpoint behind: its
                // lease, dropped unread here or with its channel, closes it.
                let lease = |ep| crate::driver::Lease::new(ep, undo, |ep| Cmd::Disconnect { ep });
                let _ = reply.send(self.connect(&addr, &rkeys).map(lease));
            }
            Cmd::Disconnect { ep } => {
                self.prepared.retain(|_, p| p.ep != ep);
                if let Some(e) = self.eps.remove(&ep) {
                    self.close_ep(e, false);
                }
            }
            Cmd::Prepare { ep, segs, reply } => {
                if let Err(Ok(id)) = reply.send(self.prepare(ep, &segs)) {
                    self.prepared.remove(&id);
                }
            }
            Cmd::Release { id } => {
                self.prepared.remove(&id);
            }
            Cmd::Post { id, tag, deadline, reply } => self.post(id, tag, deadline, reply),
        }
    }

    fn progress(&mut self) -> bool {
        // SAFETY: our worker, on its thread.
        while unsafe { self.lib.ucp_worker_progress(self.worker) } > 0 {}
        if !self.closing.is_empty() {
            self.progress_closing();
        }
        if self.pending.is_empty() {
            return !self.closing.is_empty();
        }
        let now = Instant::now();
        // Endpoints whose writes failed or ran past their deadline: abandoned below.
        let mut failed: Vec<(u64, TransferError)> = Vec::new();
        let mut i = 0;
        while i < self.pending.len() {
            let p = &self.pending[i];
            // SAFETY: a live flush request of this worker.
            let s = unsafe { self.lib.ucp_request_check_status(p.req) };
            if s == sys::UCS_INPROGRESS {
                if now >= p.deadline && !failed.iter().any(|(ep, _)| *ep == p.ep) {
                    let cause = TransferError::Timeout {
                        what: "ucx write completion",
                        after: Duration::ZERO,
                    };
                    failed.push((p.ep, cause));
                }
                i += 1;
                continue;
            }
            let p = self.pending.swap_remove(i);
            // SAFETY: freeing a completed request once.
            unsafe { self.lib.ucp_request_free(p.req) };
            if s == sys::UCS_OK {
                // Every put is in the peer's memory: now the notification.
                let r = self.notify(p.ep, p.tag);
                if let Err(e) = &r
                    && !failed.iter().any(|(ep, _)| *ep == p.ep)
                {
                    failed.push((
                        p.ep,
                        TransferError::PeerLost {
                            peer: format!("ucx endpoint #{}", p.ep),
                            detail: e.to_string(),
                        },
                    ));
                }
                let _ = p.reply.send(r);
            } else {
                let cause = TransferError::PeerLost {
                    peer: format!("ucx endpoint #{}", p.ep),
                    detail: self.status_str(s),
                };
                let _ = p.reply.send(Err(TransferError::abandoned(BackendKind::Ucx, &cause)));
                if !failed.iter().any(|(ep, _)| *ep == p.ep) {
                    failed.push((p.ep, cause));
                }
            }
        }
        for (ep, cause) in failed {
            self.abandon_ep(ep, &cause, false);
        }
        !self.pending.is_empty() || !self.closing.is_empty()
    }

    fn finish(&mut self) {
        for p in std::mem::take(&mut self.pending) {
            // SAFETY: cancelling and freeing our own requests at shutdown.
            unsafe {
                self.lib.ucp_request_cancel(self.worker, p.req);
                self.lib.ucp_request_free(p.req);
            }
            let _ = p.reply.send(Err(TransferError::Closed));
        }
        self.prepared.clear();
        let eps: Vec<Endpoint> = self.eps.drain().map(|(_, e)| e).collect();
        for e in eps {
            self.close_ep(e, true);
        }
        self.wait_closes();
        let ids: Vec<u32> = self.regions.keys().copied().collect();
        for id in ids {
            self.deregister(id);
        }
        if !self.worker.is_null() {
            // SAFETY: every endpoint and request of the worker is gone.
            unsafe { self.lib.ucp_worker_destroy(self.worker) };
            self.worker = ptr::null_mut();
        }
        if !self.context.is_null() {
            // SAFETY: the worker and every mapping are gone.
            unsafe { self.lib.ucp_cleanup(self.context) };
            self.context = ptr::null_mut();
        }
    }
}

/// UCX (ours and the one inside NIXL) patches the CUDA driver's allocation calls to learn
/// the memory type of every pointer. pdserve registers its KV pools once, with explicit
/// memory types, so it needs none of that, and the patched calls slow every candle
/// allocation: on the lent H100 the decode steps of a 1B model took 45% longer with
/// them (docs/benchmarks.md). Unless the operator chose a mode, turn them off. Call at
/// the start of `main`, before any other thread exists. With the hooks off, initialise
/// CUDA (allocate or bind the device) before starting an `Agent`: UCX looks for CUDA once,
/// when its context is created.
pub fn process_defaults() {
    if std::env::var_os("UCX_MEM_CUDA_HOOK_MODE").is_none() {
        // SAFETY: called first thing in `main`, while the process has a single thread, so
        // nothing reads the environment concurrently.
        unsafe { std::env::set_var("UCX_MEM_CUDA_HOOK_MODE", "none") };
    }
}
