//! Incoming connections: how many may be open at once, and how long one may stay silent once it connects.
//!
//! Anyone who reaches a TCP port can open connections without a token, and each one costs a descriptor, which is
//! also what a job needs to start. So the server raises its descriptor limit as far as it may, keeps at most a
//! quarter of it for connections (closing the ones past that at once), and closes a connection that sends nothing
//! within [`FIRST_BYTES_LIMIT`].

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

/// A connection that has sent nothing this long after it was accepted is closed.
pub const FIRST_BYTES_LIMIT: Duration = Duration::from_secs(10);

/// How long accepting waits after a failure (no descriptor left): the connection stays in the backlog, and
/// accepting again at once would only spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// A refused connection is logged at most this often.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Raises the soft limit on open descriptors to the hard one, and returns the limit in force (`None` where the
/// system has no such limit to read).
pub fn raise_descriptor_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit(2) and setrlimit(2) read and write only the struct passed to them.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return None;
            }
            if limit.rlim_cur < limit.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: limit.rlim_max,
                    rlim_max: limit.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    limit = raised;
                }
            }
        }
        #[allow(
            clippy::useless_conversion,
            reason = "rlim_t is u64 on Linux, not on every unix"
        )]
        Some(u64::try_from(limit.rlim_cur).unwrap_or(u64::MAX))
    }
    #[cfg(windows)]
    None
}

/// How many connections may be open at once: a quarter of the descriptors, so that jobs keep the rest.
pub fn connection_limit(descriptors: Option<u64>) -> usize {
    let quarter = descriptors.unwrap_or(1024) / 4;
    usize::try_from(quarter.clamp(16, 65_536)).unwrap_or(16)
}

/// A listener the server accepts connections from.
pub trait Accept: Send + 'static {
    type Io: Send + 'static;
    fn accept_one(&mut self) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept_one(&mut self) -> io::Result<Self::Io> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

#[cfg(unix)]
impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept_one(&mut self) -> io::Result<Self::Io> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

/// Accepts connections from `listener` in a task of its own and hands them on, at most `limit` open at once.
pub fn limited<L: Accept>(
    mut listener: L,
    limit: usize,
) -> ReceiverStream<io::Result<Limited<L::Io>>> {
    let (sender, receiver) = mpsc::channel(1);
    let permits = Arc::new(Semaphore::new(limit));
    tokio::spawn(async move {
        let mut last_refusal_log: Option<Instant> = None;
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept_one() => accepted,
                () = sender.closed() => return,
            };
            match accepted {
                Ok(io) => match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        if sender.send(Ok(Limited::new(io, permit))).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => {
                        drop(io);
                        if last_refusal_log.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_EVERY) {
                            tracing::warn!(
                                limit,
                                "refusing connections: as many are open as the server allows"
                            );
                            last_refusal_log = Some(Instant::now());
                        }
                    }
                },
                Err(error) => {
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            }
        }
    });
    ReceiverStream::new(receiver)
}

/// An accepted connection: it holds its place among the open ones until it closes, and fails if it sends nothing
/// within [`FIRST_BYTES_LIMIT`].
pub struct Limited<Io> {
    io: Io,
    _place: OwnedSemaphorePermit,
    /// Until the first byte arrives.
    silence: Option<Pin<Box<Sleep>>>,
}

impl<Io> Limited<Io> {
    fn new(io: Io, place: OwnedSemaphorePermit) -> Self {
        Limited {
            io,
            _place: place,
            silence: Some(Box::pin(tokio::time::sleep(FIRST_BYTES_LIMIT))),
        }
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for Limited<Io> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Some(silence) = &mut this.silence {
            match &polled {
                Poll::Ready(Ok(())) if buf.filled().len() > before => this.silence = None,
                Poll::Pending if silence.as_mut().poll(cx).is_ready() => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the connection sent nothing after it was opened",
                    )));
                }
                _ => {}
            }
        }
        polled
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Limited<Io> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<Io: Connected> Connected for Limited<Io> {
    type ConnectInfo = Io::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_get_a_quarter_of_the_descriptors_within_bounds() {
        assert_eq!(connection_limit(Some(1024)), 256);
        assert_eq!(connection_limit(Some(20)), 16);
        assert_eq!(connection_limit(Some(u64::MAX)), 65_536);
        assert_eq!(connection_limit(None), 256);
    }
}
