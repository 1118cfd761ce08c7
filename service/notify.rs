//! Tells a service manager (systemd) how the server is doing, when one is watching; a no-op otherwise.

use std::time::Duration;

/// The server is up: migrations ran, interrupted jobs were recovered, the listener accepts connections.
pub fn ready(status: &str) {
    #[cfg(unix)]
    send(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
    #[cfg(windows)]
    let _ = status;
}

/// The server drains and stops.
pub fn stopping() {
    #[cfg(unix)]
    send(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("draining workers"),
    ]);
}

/// How often to tell the watchdog the scheduler is alive: half its timeout, if it has one. `WATCHDOG_USEC=0`
/// means no watchdog, not one to ping without pause.
pub fn watchdog_interval() -> Option<Duration> {
    #[cfg(unix)]
    return sd_notify::watchdog_enabled()
        .filter(|timeout| !timeout.is_zero())
        .map(|timeout| timeout / 2);
    #[cfg(windows)]
    None
}

pub fn watchdog_ping() {
    #[cfg(unix)]
    send(&[sd_notify::NotifyState::Watchdog]);
}

#[cfg(unix)]
fn send(states: &[sd_notify::NotifyState]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "cannot notify the service manager");
    }
}
