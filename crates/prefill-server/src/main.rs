//! `prefill-server`: load config, build, serve until SIGTERM (see `daemon::main`).
fn main() {
    daemon::main::<prefill_server::PrefillConfig, _, _>("prefill-server", prefill_server::serve)
}
