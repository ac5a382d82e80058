//! The hand-over channel between an agent and its next binary: a `SOCK_SEQPACKET` Unix
//! socket pair, one message per record, descriptors attached by `SCM_RIGHTS`.
//!
//! A record is a little-endian `u32` length, that many bytes of JSON (`Message`), then
//! raw bytes the message describes (a session's unsent userspace bytes).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::l4::session::SessionState;
use crate::sys;

/// Largest record: a session's JSON plus up to two directions' pending bytes (each at most
/// one 64 KiB read), with room to spare.
const MAX_RECORD: usize = 512 << 10;

/// What the two agents say to each other.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Message {
    /// Old to new, first: the instance lock, then one listener per entry, then the admin
    /// listener if `admin` is set, as descriptors in that order.
    Inventory {
        old_pid: u32,
        listeners: Vec<ListenerEntry>,
        admin: Option<SocketAddr>,
    },
    /// New to old: serving on the listeners; send the sessions.
    Ready { pid: u32 },
    /// New to old: could not start; the old agent goes on.
    Failed { reason: String },
    /// Old to new: one spliced session, its client and upstream sockets attached, and
    /// `pending` bytes of each direction after the JSON.
    Session {
        state: Box<SessionState>,
        pending: [usize; 2],
    },
    /// Old to new: every session is handed over (`sessions` of them); the old agent exits.
    Done { sessions: u64 },
}

/// A listener handed over, and whose it was.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ListenerEntry {
    pub frontend: String,
    pub addr: SocketAddr,
}

/// One end of the hand-over channel, driven by tokio.
pub struct Channel(AsyncFd<OwnedFd>);

/// A record as received.
pub struct Received {
    pub message: Message,
    pub extra: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Channel {
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        sys::set_nonblocking(fd.as_fd())?;
        // A record can exceed the default send buffer (about 208 KiB).
        let _ = sys::set_sndbuf_force(fd.as_fd(), (2 * MAX_RECORD) as libc::c_int);
        Ok(Self(sys::async_fd(fd)?))
    }

    /// Sends one record.
    pub async fn send(
        &self,
        message: &Message,
        extra: &[&[u8]],
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<()> {
        let record = encode(message, extra)?;
        self.0
            .async_io(Interest::WRITABLE, |fd| {
                sys::send_with_fds(fd.as_fd(), &record, fds)
            })
            .await
    }

    /// The next record, or `None` once the other agent closed its end.
    pub async fn recv(&self) -> io::Result<Option<Received>> {
        let mut buf = vec![0u8; MAX_RECORD];
        let (n, fds) = self
            .0
            .async_io(Interest::READABLE, |fd| {
                sys::recv_with_fds(fd.as_fd(), &mut buf)
            })
            .await?;
        if n == 0 && fds.is_empty() {
            return Ok(None);
        }
        let (message, extra) = decode(&buf[..n])?;
        Ok(Some(Received {
            message,
            extra: extra.to_vec(),
            fds,
        }))
    }
}

/// The next record, waiting for it on a blocking descriptor (at start-up, before any
/// runtime serves); `None` once the other agent closed its end.
pub fn recv_blocking(fd: BorrowedFd<'_>) -> io::Result<Option<Received>> {
    let mut buf = vec![0u8; MAX_RECORD];
    let (n, fds) = sys::recv_with_fds(fd, &mut buf)?;
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    let (message, extra) = decode(&buf[..n])?;
    Ok(Some(Received {
        message,
        extra: extra.to_vec(),
        fds,
    }))
}

pub(super) fn encode(message: &Message, extra: &[&[u8]]) -> io::Result<Vec<u8>> {
    let json = serde_json::to_vec(message).map_err(io::Error::other)?;
    let len = u32::try_from(json.len()).map_err(io::Error::other)?;
    let mut record =
        Vec::with_capacity(4 + json.len() + extra.iter().map(|e| e.len()).sum::<usize>());
    record.extend_from_slice(&len.to_le_bytes());
    record.extend_from_slice(&json);
    for bytes in extra {
        record.extend_from_slice(bytes);
    }
    if record.len() > MAX_RECORD {
        return Err(io::Error::other(format!(
            "hand-over record of {} bytes exceeds {MAX_RECORD}",
            record.len()
        )));
    }
    Ok(record)
}

fn decode(record: &[u8]) -> io::Result<(Message, &[u8])> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let len = record
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| invalid("hand-over record shorter than its length"))? as usize;
    let json = record
        .get(4..4 + len)
        .ok_or_else(|| invalid("hand-over record shorter than its JSON"))?;
    let message = serde_json::from_slice(json).map_err(|e| invalid(&e.to_string()))?;
    Ok((message, &record[4 + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_with_their_raw_bytes() {
        let message = Message::Done { sessions: 7 };
        let record = encode(&message, &[b"ab", b"c"]).unwrap();
        let (back, extra) = decode(&record).unwrap();
        assert_eq!(back, message);
        assert_eq!(extra, b"abc");
        assert!(decode(&record[..3]).is_err());
        assert!(decode(&record[..8]).is_err());
    }

    #[tokio::test]
    async fn descriptors_travel_with_the_record() {
        let (a, b) = sys::seqpacket_pair().unwrap();
        let (a, b) = (Channel::new(a).unwrap(), Channel::new(b).unwrap());
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let message = Message::Ready { pid: 1 };
        a.send(&message, &[], &[file.as_fd()]).await.unwrap();
        let got = b.recv().await.unwrap().unwrap();
        assert_eq!(got.message, message);
        assert_eq!(got.fds.len(), 1);
        let mut copy = std::fs::File::from(got.fds.into_iter().next().unwrap());
        let mut text = String::new();
        std::io::Read::read_to_string(&mut copy, &mut text).unwrap();
        assert!(text.contains("Pid:"));
        drop(a);
        assert!(b.recv().await.unwrap().is_none());
    }
}
