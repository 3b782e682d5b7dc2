//! The byte stream of a file transfer: plain, as IP Messenger sends it (the file's bytes, then
//! the connection closes), or sealed between chat peers with a key. A sealed stream is a
//! sequence of frames, each `length (4 bytes, big-endian) | ChaCha20-Poly1305(payload) | tag`
//! under one key per direction and connection (`Key::for_stream`, from a nonce of each end),
//! the frame counter as nonce, and an empty frame to end it: a stream cut short, reordered or
//! altered does not read as a whole one.

use std::io::{self, Read, Write};

use ring::aead::{Aad, LessSafeKey};

use crate::seal::nonce;

/// Payload bytes per frame.
pub const FRAME: usize = 64 * 1024;
const TAG: usize = 16;

fn broken(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_string())
}

/// Writes frames to `inner`; [`SealedWriter::finish`] writes the end frame.
pub struct SealedWriter<W: Write> {
    inner: W,
    key: LessSafeKey,
    counter: u64,
    buf: Vec<u8>,
}

impl<W: Write> SealedWriter<W> {
    pub fn new(inner: W, key: LessSafeKey) -> Self {
        SealedWriter {
            inner,
            key,
            counter: 0,
            buf: Vec::with_capacity(FRAME),
        }
    }

    fn frame(&mut self) -> io::Result<()> {
        let mut out = Vec::with_capacity(4 + self.buf.len() + TAG);
        out.extend_from_slice(&(self.buf.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.buf);
        let (head, body) = out.split_at_mut(4);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(self.counter), Aad::from(&*head), body)
            .map_err(|_| broken("cannot seal"))?;
        out.extend_from_slice(tag.as_ref());
        self.counter += 1;
        self.buf.clear();
        self.inner.write_all(&out)
    }

    /// Seals what is buffered and the end frame.
    pub fn finish(mut self) -> io::Result<W> {
        if !self.buf.is_empty() {
            self.frame()?;
        }
        self.frame()?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for SealedWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(FRAME - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == FRAME {
            self.frame()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.frame()?;
        }
        self.inner.flush()
    }
}

/// Reads frames from `inner`: the payloads in order, then end of stream at the end frame.
/// A frame that does not open, or a stream that stops before its end frame, is an error.
pub struct SealedReader<R: Read> {
    inner: R,
    key: LessSafeKey,
    counter: u64,
    plain: Vec<u8>,
    at: usize,
    ended: bool,
}

impl<R: Read> SealedReader<R> {
    pub fn new(inner: R, key: LessSafeKey) -> Self {
        SealedReader {
            inner,
            key,
            counter: 0,
            plain: Vec::new(),
            at: 0,
            ended: false,
        }
    }

    fn next_frame(&mut self) -> io::Result<()> {
        let mut head = [0u8; 4];
        self.inner
            .read_exact(&mut head)
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => broken("the sealed stream stopped before its end"),
                _ => e,
            })?;
        let len = u32::from_be_bytes(head) as usize;
        if len > FRAME {
            return Err(broken("a sealed frame longer than allowed"));
        }
        let mut body = vec![0u8; len + TAG];
        self.inner
            .read_exact(&mut body)
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => broken("the sealed stream stopped inside a frame"),
                _ => e,
            })?;
        let plain = self
            .key
            .open_in_place(nonce(self.counter), Aad::from(&head), &mut body)
            .map_err(|_| broken("a sealed frame did not open (wrong key, or altered)"))?;
        self.counter += 1;
        if plain.is_empty() {
            self.ended = true;
        }
        let n = plain.len();
        body.truncate(n);
        self.plain = body;
        self.at = 0;
        Ok(())
    }
}

impl<R: Read> Read for SealedReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.plain.len() {
            if self.ended {
                return Ok(0);
            }
            self.next_frame()?;
        }
        let n = out.len().min(self.plain.len() - self.at);
        out[..n].copy_from_slice(&self.plain[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seal::Key;

    fn keys() -> crate::seal::StreamKeys {
        Key::derive(b"secret").for_stream(&[1; 16], &[2; 16])
    }

    fn sealed(data: &[u8]) -> Vec<u8> {
        let mut w = SealedWriter::new(Vec::new(), keys().to_client);
        w.write_all(data).unwrap();
        w.finish().unwrap()
    }

    fn read_all(bytes: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        SealedReader::new(bytes, keys().to_client).read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn a_stream_reads_back_whole() {
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        assert_eq!(read_all(&sealed(&data)).unwrap(), data);
        assert_eq!(read_all(&sealed(b"")).unwrap(), b"");
    }

    #[test]
    fn cut_altered_or_foreign_streams_never_read_as_whole() {
        let data = vec![7u8; 150_000];
        let good = sealed(&data);
        // Cut anywhere, even right before the end frame.
        for cut in [0, 3, 4 + 10, good.len() - 4 - TAG, good.len() - 1] {
            assert!(read_all(&good[..cut]).is_err(), "cut at {cut}");
        }
        // One bit flipped.
        let mut bad = good.clone();
        bad[100] ^= 1;
        assert!(read_all(&bad).is_err());
        // Frames in another order.
        let frame = 4 + FRAME + TAG;
        let mut swapped = good[frame..2 * frame].to_vec();
        swapped.extend_from_slice(&good[..frame]);
        swapped.extend_from_slice(&good[2 * frame..]);
        assert!(read_all(&swapped).is_err());
        // The other direction's key, or another connection's, opens nothing.
        let mut other = Vec::new();
        let r = SealedReader::new(&good[..], keys().to_server).read_to_end(&mut other);
        assert!(r.is_err());
        let elsewhere = Key::derive(b"secret").for_stream(&[1; 16], &[3; 16]);
        assert!(SealedReader::new(&good[..], elsewhere.to_client)
            .read_to_end(&mut other)
            .is_err());
        // A length beyond a frame is refused before anything is allocated for it.
        assert!(read_all(&[0xff, 0xff, 0xff, 0xff]).is_err());
    }
}
