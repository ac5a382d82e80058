//! The first bytes of a client connection, read under the header timeout. hyper's
//! version sniffing (which `serve_connection_with_upgrades` always does) and its HTTP/2
//! handshake both wait for ever on a client that completed TLS and sends nothing, so such
//! a client would hold its connection slot for good. What is read here is replayed to
//! hyper untouched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf as _, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};

/// The fixed start of every HTTP/2 connection (RFC 9113, 3.4).
const H2_MAGIC: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const SETTINGS_FRAME: u8 = 0x4;
/// The largest first SETTINGS frame read here (HTTP/2's default frame size); hyper
/// refuses a larger one itself.
const MAX_SETTINGS_LEN: usize = 16_384;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

/// How a connection opened.
pub enum Opening<S> {
    /// The protocol is known; the stream replays what was read.
    Ready(Protocol, Replay<S>),
    /// The client closed (or failed) before anything decisive.
    Closed,
    /// Nothing decisive within the time: `h2` when the HTTP/2 preface had begun (or the
    /// client asked for h2 in ALPN), i.e. what is missing is a preface, not a request.
    TimedOut { h2: bool },
}

/// Reads until the protocol is known: for HTTP/2 the whole preface (magic and the
/// SETTINGS frame), for HTTP/1.1 the first byte that is not the magic's.
pub async fn read<S: AsyncRead + Unpin>(
    mut stream: S,
    alpn_h2: bool,
    limit: Duration,
) -> Opening<S> {
    let mut read = Vec::with_capacity(H2_MAGIC.len() + FRAME_HEADER_LEN);
    match tokio::time::timeout(limit, opening(&mut stream, &mut read)).await {
        Ok(Ok(Some(protocol))) => Opening::Ready(
            protocol,
            Replay {
                prefix: Bytes::from(read),
                inner: stream,
            },
        ),
        Ok(Ok(None) | Err(_)) => Opening::Closed,
        Err(_) => Opening::TimedOut {
            h2: alpn_h2 || !read.is_empty(),
        },
    }
}

/// The protocol, or `None` at end of stream.
async fn opening<S: AsyncRead + Unpin>(
    stream: &mut S,
    read: &mut Vec<u8>,
) -> io::Result<Option<Protocol>> {
    while read.len() < H2_MAGIC.len() {
        if !fill(stream, read, H2_MAGIC.len()).await? {
            return Ok(None);
        }
        if !H2_MAGIC.starts_with(read) {
            return Ok(Some(Protocol::Http1));
        }
    }
    let header_end = H2_MAGIC.len() + FRAME_HEADER_LEN;
    while read.len() < header_end {
        if !fill(stream, read, header_end).await? {
            return Ok(None);
        }
    }
    let header = &read[H2_MAGIC.len()..header_end];
    let length =
        usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
    if header[3] == SETTINGS_FRAME && length <= MAX_SETTINGS_LEN {
        while read.len() < header_end + length {
            if !fill(stream, read, header_end + length).await? {
                return Ok(None);
            }
        }
    }
    // Anything else is a protocol error hyper answers with a GOAWAY.
    Ok(Some(Protocol::Http2))
}

/// Reads more, up to `upto` bytes in all; false at end of stream.
async fn fill<S: AsyncRead + Unpin>(
    stream: &mut S,
    read: &mut Vec<u8>,
    upto: usize,
) -> io::Result<bool> {
    let mut chunk = [0u8; 64];
    let want = (upto - read.len()).min(chunk.len());
    let n = stream.read(&mut chunk[..want]).await?;
    read.extend_from_slice(&chunk[..n]);
    Ok(n > 0)
}

/// A stream that first yields the bytes already read from it.
pub struct Replay<S> {
    prefix: Bytes,
    inner: S,
}

impl<S: crate::relay::Socket> crate::relay::Socket for Replay<S> {
    fn tcp(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.inner.tcp()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt as _;

    const SHORT: Duration = Duration::from_millis(200);

    /// What `read` makes of `sent` (the writer stays open unless `close`), and what the
    /// stream then yields.
    async fn open(sent: &[u8], alpn_h2: bool, close: bool) -> (String, Vec<u8>) {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client.write_all(sent).await.unwrap();
        let open_client = (!close).then_some(client);
        let outcome = read(server, alpn_h2, SHORT).await;
        drop(open_client);
        match outcome {
            Opening::Ready(protocol, mut replay) => {
                let mut all = Vec::new();
                replay.read_to_end(&mut all).await.unwrap();
                (format!("{protocol:?}"), all)
            }
            Opening::Closed => ("closed".into(), Vec::new()),
            Opening::TimedOut { h2 } => (format!("timed out, h2 {h2}"), Vec::new()),
        }
    }

    fn settings(payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut frame = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            0x4,
            0,
            0,
            0,
            0,
            0,
        ];
        frame.extend_from_slice(payload);
        frame
    }

    #[tokio::test]
    async fn http1_is_known_at_the_first_byte_and_replayed_whole() {
        let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let (protocol, replayed) = open(request, false, false).await;
        assert_eq!(
            (protocol.as_str(), replayed.as_slice()),
            ("Http1", &request[..])
        );
        // Only "G" so far: already not HTTP/2.
        let (protocol, replayed) = open(b"G", true, false).await;
        assert_eq!(
            (protocol.as_str(), replayed.as_slice()),
            ("Http1", &b"G"[..])
        );
    }

    #[tokio::test]
    async fn http2_waits_for_magic_and_settings() {
        let mut preface = H2_MAGIC.to_vec();
        preface.extend(settings(&[0, 3, 0, 0, 0, 100]));
        preface.extend_from_slice(b"more frames");
        let (protocol, replayed) = open(&preface, true, false).await;
        assert_eq!((protocol.as_str(), replayed), ("Http2", preface));

        // The magic alone, or the magic and half a SETTINGS frame: not yet.
        let (outcome, _) = open(H2_MAGIC, false, false).await;
        assert_eq!(outcome, "timed out, h2 true");
        let mut partial = H2_MAGIC.to_vec();
        partial.extend(&settings(&[0, 3, 0, 0, 0, 100])[..12]);
        let (outcome, _) = open(&partial, false, false).await;
        assert_eq!(outcome, "timed out, h2 true");
        // A first frame that is not SETTINGS is hyper's to refuse.
        let mut ping = H2_MAGIC.to_vec();
        ping.extend_from_slice(&[0, 0, 8, 0x6, 0, 0, 0, 0, 0]);
        let (protocol, replayed) = open(&ping, false, false).await;
        assert_eq!((protocol.as_str(), replayed), ("Http2", ping));
    }

    #[tokio::test]
    async fn silence_times_out_and_a_close_is_told_apart() {
        assert_eq!(open(b"", true, false).await.0, "timed out, h2 true");
        assert_eq!(open(b"", false, false).await.0, "timed out, h2 false");
        assert_eq!(
            open(b"PRI * HT", false, false).await.0,
            "timed out, h2 true"
        );
        assert_eq!(open(b"", false, true).await.0, "closed");
        assert_eq!(open(b"PRI", false, true).await.0, "closed");
    }
}
