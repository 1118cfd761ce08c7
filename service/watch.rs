//! One WatchEvents stream: the events a watcher asked for, with a bounded buffer between the server and it.
//!
//! A watcher that reads slower than jobs write would otherwise make the server hold everything it has not read.
//! Its buffer is counted in bytes, and a watcher that fills it, or that the event broadcast left behind, is told
//! so and cut: it re-reads what it needs and watches again.

use std::pin::Pin;
use std::sync::Arc;

use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use crate::event::Stamped;
use crate::metrics::Metrics;
use crate::pb;

/// Bytes of encoded events a watcher may have waiting: 8 full output chunks. HTTP/2 buffers at most about
/// 400 KiB more per stream, whatever window the client offers.
pub const BUFFER_BYTES: usize = 64 * 1024;

pub type EventStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEventsResponse, Status>> + Send>>;

/// Each event travels with its share of the watcher's buffer, given back when the stream hands it on.
type Queued = (
    Result<pb::WatchEventsResponse, Status>,
    Option<OwnedSemaphorePermit>,
);

/// Streams the events of `job_id` (every event when empty) from `events`, until `closing` turns true, the watcher
/// hangs up, or it falls behind.
pub fn stream(
    mut events: broadcast::Receiver<Stamped>,
    mut closing: watch::Receiver<bool>,
    job_id: String,
    metrics: Arc<Metrics>,
) -> EventStream {
    let budget = Arc::new(Semaphore::new(BUFFER_BYTES));
    // Unbounded in count, bounded in bytes by `budget`: the last message, that the watcher fell behind, always
    // finds room.
    let (sender, receiver) = mpsc::unbounded_channel::<Queued>();
    tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                event = events.recv() => event,
                _ = closing.wait_for(|closing| *closing) => return,
                () = sender.closed() => return,
            };
            let event = match event {
                Ok(stamped)
                    if job_id.is_empty() || stamped.event.job_id() == Some(job_id.as_str()) =>
                {
                    stamped
                }
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(
                        missed,
                        "an event watcher fell behind the broadcast; ending its stream"
                    );
                    metrics.watcher_cut(missed);
                    let _ = sender.send((Err(fell_behind(&format!("by {missed} events"))), None));
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let response = pb::WatchEventsResponse::from(event);
            let cost = response.encoded_len().clamp(1, BUFFER_BYTES);
            let Ok(permit) = budget
                .clone()
                .try_acquire_many_owned(u32::try_from(cost).unwrap_or(u32::MAX))
            else {
                tracing::warn!(
                    buffer_bytes = BUFFER_BYTES,
                    "an event watcher does not read; ending its stream"
                );
                // The event that did not fit is the one it misses: the stream ends with it.
                metrics.watcher_cut(1);
                let waiting = format!("with {} KiB of events waiting", BUFFER_BYTES / 1024);
                let _ = sender.send((Err(fell_behind(&waiting)), None));
                return;
            };
            if sender.send((Ok(response), Some(permit))).is_err() {
                return;
            }
        }
    });
    Box::pin(UnboundedReceiverStream::new(receiver).map(|(item, _permit)| item))
}

fn fell_behind(how: &str) -> Status {
    crate::error::Refusal::new(
        crate::error::Reason::EventsMissed,
        format!(
            "this watcher fell behind {how} and was cut; re-read the jobs with GetJob or List, and watch again"
        ),
    )
    .into()
}
