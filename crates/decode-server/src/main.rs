//! `decode-server`: load config, build, serve until SIGTERM (see `daemon::main`).
fn main() {
    daemon::main::<decode_server::DecodeConfig, _, _>("decode-server", decode_server::serve)
}
