//! What an attempt prints, as it is stored: one stream of bytes in the order the server read them, each byte
//! tagged with the pipe it came from, written in chunks while the attempt runs.
//!
//! Past `max_output_bytes` the head and the tail survive: the first half is kept as it comes, and of the rest only
//! about the last half stays stored, older tail chunks being deleted as new ones arrive (a short tail is cut in
//! memory before it is written at all). A reader sees the dropped
//! middle as a gap between the offsets of two chunks and marks it. Pure code: the executor feeds it and writes
//! what it returns.

use std::ops::Range;

/// The most one chunk holds: a chunk is written once it is this full, if its time has not come before.
pub const MAX_CHUNK: usize = 64 * 1024;

/// A tail up to this long is kept in memory between writes, cut to its length as more comes: a command that
/// floods its output costs a write per flush interval, not one per chunk.
pub const TAIL_IN_MEMORY: u64 = 1024 * 1024;

/// Which pipe of the command a byte came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(into = "u8", try_from = "u8")]
pub enum Stream {
    Stdout = 1,
    Stderr = 2,
}

impl From<Stream> for u8 {
    fn from(stream: Stream) -> u8 {
        stream as u8
    }
}

impl TryFrom<u8> for Stream {
    type Error = String;

    fn try_from(code: u8) -> Result<Stream, String> {
        match code {
            1 => Ok(Stream::Stdout),
            2 => Ok(Stream::Stderr),
            other => Err(format!("{other} names no output stream")),
        }
    }
}

/// Consecutive bytes of one stream within a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Span(pub Stream, pub u32);

/// Bytes of an attempt's output from offset `start`, with the streams they came from, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chunk {
    pub start: u64,
    pub data: Vec<u8>,
    pub spans: Vec<Span>,
}

impl Chunk {
    pub fn end(&self) -> u64 {
        self.start + self.data.len() as u64
    }

    fn push(&mut self, stream: Stream, bytes: &[u8]) {
        self.data.extend_from_slice(bytes);
        let len = u32::try_from(bytes.len()).expect("pieces are small");
        match self.spans.last_mut() {
            Some(Span(last, count)) if *last == stream => *count += len,
            _ => self.spans.push(Span(stream, len)),
        }
    }

    /// Drops the bytes before `offset`, if it holds any.
    pub fn starting_at(mut self, offset: u64) -> Chunk {
        if offset > self.start {
            let count = usize::try_from(offset - self.start).unwrap_or(usize::MAX);
            self.drop_front(count.min(self.data.len()));
        }
        self
    }

    /// Drops the first `count` bytes.
    fn drop_front(&mut self, mut count: usize) {
        self.data.drain(..count);
        self.start += count as u64;
        while count > 0 {
            let Span(_, len) = &mut self.spans[0];
            let taken = (*len as usize).min(count);
            *len -= u32::try_from(taken).expect("within a span");
            count -= taken;
            if *len == 0 {
                self.spans.remove(0);
            }
        }
    }

    /// The chunk's bytes split by stream, each piece with its offset.
    pub fn pieces(&self) -> impl Iterator<Item = (Stream, u64, &[u8])> {
        let mut at = 0usize;
        self.spans.iter().map(move |Span(stream, len)| {
            let piece = &self.data[at..at + *len as usize];
            let offset = self.start + at as u64;
            at += *len as usize;
            (*stream, offset, piece)
        })
    }

    /// The layout of `data` as stored beside it: `[[stream, length], ...]`.
    pub fn layout(&self) -> String {
        serde_json::to_string(&self.spans).expect("spans serialise")
    }

    /// A stored chunk. A layout that does not read, or does not add up to the data, makes it one stdout span:
    /// the bytes are shown rather than lost.
    pub fn stored(start: u64, data: Vec<u8>, layout: &str) -> Chunk {
        let spans = serde_json::from_str::<Vec<Span>>(layout)
            .ok()
            .filter(|spans| {
                spans
                    .iter()
                    .map(|Span(_, len)| *len as usize)
                    .sum::<usize>()
                    == data.len()
            })
            .unwrap_or_else(|| {
                vec![Span(
                    Stream::Stdout,
                    u32::try_from(data.len()).unwrap_or(u32::MAX),
                )]
            });
        Chunk { start, data, spans }
    }
}

/// What to write for one attempt: new chunks, and the range of the stored tail that is no longer kept (chunks that
/// lie wholly inside it are deleted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputWrite {
    /// [`crate::job::Job::seq`] of the job.
    pub seq: i64,
    pub run: u32,
    pub chunks: Vec<Chunk>,
    pub forget: Option<Range<u64>>,
}

/// The output of one attempt as it is being recorded.
#[derive(Debug)]
pub struct Recording {
    seq: i64,
    run: u32,
    /// Bytes from offset 0 up to this are kept whole.
    head: u64,
    /// Of the bytes past the head, about this many of the newest are kept.
    tail: u64,
    /// Bytes read so far.
    seen: u64,
    pending: Chunk,
    /// Chunks complete and not yet taken.
    ready: Vec<Chunk>,
    /// Where the stored tail was last cut: bytes before it (and past the head) are forgotten.
    cut: u64,
}

impl Recording {
    /// Records run `run` of the job in row `seq`, keeping `limit` bytes (head and tail) at most.
    pub fn new(seq: i64, run: u32, limit: usize) -> Recording {
        let limit = limit as u64;
        let head = limit / 2;
        Recording {
            seq,
            run,
            head,
            tail: limit - head,
            seen: 0,
            pending: Chunk::default(),
            ready: Vec::new(),
            cut: head,
        }
    }

    /// Adds what the command wrote next on `stream`.
    pub fn push(&mut self, stream: Stream, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.pending.data.is_empty() {
                self.pending.start = self.seen;
            }
            // A chunk never straddles the end of the head, so that a tail chunk can be shortened on its own.
            let room = if self.seen < self.head {
                (MAX_CHUNK - self.pending.data.len()).min((self.head - self.seen) as usize)
            } else if self.tail <= TAIL_IN_MEMORY {
                usize::MAX
            } else {
                MAX_CHUNK - self.pending.data.len()
            };
            let (now, later) = bytes.split_at(room.min(bytes.len()));
            self.pending.push(stream, now);
            self.seen += now.len() as u64;
            bytes = later;
            if self.pending.start >= self.head && self.pending.data.len() as u64 > self.tail {
                let excess = self.pending.data.len() - self.tail as usize;
                self.pending.drop_front(excess);
            }
            let in_head = self.pending.start < self.head;
            let full =
                self.pending.data.len() == MAX_CHUNK && (in_head || self.tail > TAIL_IN_MEMORY);
            if full || in_head && self.seen == self.head {
                self.ready.push(std::mem::take(&mut self.pending));
            }
        }
    }

    /// Whether a chunk is full and should be written now, before its time.
    pub fn full(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Whether anything was dropped or will be: more was read than is kept.
    pub fn truncated(&self) -> bool {
        self.seen > self.head + self.tail
    }

    /// What to write now, if anything: the pending chunks, and the tail to forget.
    pub fn take(&mut self) -> Option<OutputWrite> {
        let mut chunks = std::mem::take(&mut self.ready);
        if !self.pending.data.is_empty() {
            chunks.push(std::mem::take(&mut self.pending));
        }
        // From the head on: a chunk that straddled the last cut lies wholly before this one.
        let keep_from = self.seen.saturating_sub(self.tail).max(self.head);
        let forget = (keep_from > self.cut).then_some(self.head..keep_from);
        self.cut = self.cut.max(keep_from);
        if chunks.is_empty() && forget.is_none() {
            return None;
        }
        Some(OutputWrite {
            seq: self.seq,
            run: self.run,
            chunks,
            forget,
        })
    }
}

/// The line that stands where output was dropped.
pub fn dropped_marker(count: u64) -> String {
    format!("\n[queuectl: output truncated, {count} bytes dropped]\n")
}

/// A part of a run's output as a reader sees it.
#[derive(Debug, PartialEq, Eq)]
pub enum Part<'a> {
    /// Bytes of one stream, from `offset` of the run's output.
    Bytes {
        stream: Stream,
        offset: u64,
        data: &'a [u8],
    },
    /// `count` bytes from `offset` on were dropped.
    Dropped { offset: u64, count: u64 },
}

/// The parts of stored `chunks` (in order, none before `from`), with the gaps between them as dropped parts.
pub fn parts(from: u64, chunks: &[Chunk]) -> Vec<Part<'_>> {
    let mut parts = Vec::new();
    let mut position = from;
    for chunk in chunks {
        if chunk.start > position {
            parts.push(Part::Dropped {
                offset: position,
                count: chunk.start - position,
            });
        }
        parts.extend(chunk.pieces().map(|(stream, offset, data)| Part::Bytes {
            stream,
            offset,
            data,
        }));
        position = position.max(chunk.end());
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(write: &OutputWrite) -> Vec<(u64, &[u8])> {
        write
            .chunks
            .iter()
            .map(|chunk| (chunk.start, chunk.data.as_slice()))
            .collect()
    }

    #[test]
    fn streams_interleave_in_one_chunk_in_the_order_read() {
        let mut recording = Recording::new(1, 1, 1000);
        recording.push(Stream::Stdout, b"out1\n");
        recording.push(Stream::Stderr, b"err1\n");
        recording.push(Stream::Stdout, b"out2\n");
        assert!(!recording.full(), "a small chunk waits for its time");
        let write = recording.take().expect("something to write");
        assert_eq!(bytes(&write), [(0, &b"out1\nerr1\nout2\n"[..])]);
        let pieces: Vec<_> = write.chunks[0].pieces().collect();
        assert_eq!(
            pieces,
            [
                (Stream::Stdout, 0, &b"out1\n"[..]),
                (Stream::Stderr, 5, &b"err1\n"[..]),
                (Stream::Stdout, 10, &b"out2\n"[..]),
            ]
        );
        assert_eq!(write.chunks[0].layout(), "[[1,5],[2,5],[1,5]]");
        assert_eq!(
            Chunk::stored(0, write.chunks[0].data.clone(), &write.chunks[0].layout()),
            write.chunks[0]
        );
        assert!(recording.take().is_none(), "nothing is written twice");
        assert!(!recording.truncated());
    }

    #[test]
    fn past_the_limit_the_head_and_the_tail_are_kept() {
        let mut recording = Recording::new(1, 1, 10);
        recording.push(Stream::Stdout, b"abc");
        recording.push(Stream::Stdout, b"defghij");
        assert!(recording.full(), "the head is written once it is whole");
        let write = recording.take().unwrap();
        assert_eq!(bytes(&write), [(0, &b"abcde"[..]), (5, &b"fghij"[..])]);
        assert_eq!(write.forget, None);

        recording.push(Stream::Stderr, b"klm");
        assert!(recording.truncated());
        let write = recording.take().unwrap();
        assert_eq!(bytes(&write), [(10, &b"klm"[..])]);
        assert_eq!(
            write.forget,
            Some(5..8),
            "the stored tail is cut to the newest 5 bytes (whole chunks: fghij stays)"
        );

        recording.push(Stream::Stdout, b"0123456789");
        let write = recording.take().unwrap();
        assert_eq!(
            bytes(&write),
            [(18, &b"56789"[..])],
            "a chunk never holds more than the tail"
        );
        assert_eq!(write.forget, Some(5..18), "fghij and klm go");
    }

    #[test]
    fn a_chunk_is_full_at_its_size_limit() {
        let mut recording = Recording::new(1, 1, 64 << 20);
        recording.push(Stream::Stdout, &vec![b'x'; MAX_CHUNK + 10]);
        assert!(recording.full());
        let write = recording.take().unwrap();
        let sizes: Vec<usize> = write.chunks.iter().map(|chunk| chunk.data.len()).collect();
        assert_eq!(sizes, [MAX_CHUNK, 10]);
    }

    #[test]
    fn a_short_tail_is_cut_in_memory_and_written_when_its_time_comes() {
        let mut recording = Recording::new(1, 1, 2 * 1024 * 1024);
        let flood = vec![b'x'; 8 * MAX_CHUNK];
        for _ in 0..10 {
            recording.push(Stream::Stdout, &flood);
        }
        let write = recording.take().unwrap();
        let tail: Vec<(u64, usize)> = write
            .chunks
            .iter()
            .filter(|chunk| chunk.start >= 1024 * 1024)
            .map(|chunk| (chunk.start, chunk.data.len()))
            .collect();
        assert_eq!(
            tail,
            [(10 * 8 * MAX_CHUNK as u64 - 1024 * 1024, 1024 * 1024)],
            "one chunk of the newest tail bytes"
        );
    }

    #[test]
    fn a_reader_sees_the_gaps_as_dropped_bytes() {
        let mut head = Chunk::default();
        head.push(Stream::Stdout, b"head");
        let mut tail = Chunk {
            start: 10,
            ..Chunk::default()
        };
        tail.push(Stream::Stderr, b"tail");
        let chunks = [head, tail];
        assert_eq!(
            parts(0, &chunks),
            [
                Part::Bytes {
                    stream: Stream::Stdout,
                    offset: 0,
                    data: b"head"
                },
                Part::Dropped {
                    offset: 4,
                    count: 6
                },
                Part::Bytes {
                    stream: Stream::Stderr,
                    offset: 10,
                    data: b"tail"
                },
            ]
        );
        let resumed = chunks[1].clone().starting_at(12);
        assert_eq!((resumed.start, resumed.data.as_slice()), (12, &b"il"[..]));
    }
}
