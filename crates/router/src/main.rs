//! `router`: load config, build, serve until SIGTERM (see `daemon::main`).
fn main() {
    daemon::main::<router::RouterConfig, _, _>("router", router::serve)
}
