//! Blocking adapters from [`std::io`] readers and writers to the envelope core, for the command
//! line and tests. The gateway wraps the same core asynchronously.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;

use bytes::BytesMut;

use super::{Decryptor, Encryptor, Error, Layout, MAX_HEADER_LEN, ParsedHeader};
use crate::keys::{DataKey, KeyError};

/// Bytes read from the input per step.
const CHUNK_LEN: usize = 256 * 1024;

/// An error while streaming a message through the envelope.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Envelope(#[from] Error),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Encrypts everything `input` yields into `output`, header first; returns the plaintext length.
///
/// `progress` is called with the number of plaintext bytes read so far.
pub fn encrypt<R: Read, W: Write>(
    mut encryptor: Encryptor,
    mut input: R,
    mut output: W,
    mut progress: impl FnMut(u64),
) -> Result<u64, StreamError> {
    output.write_all(encryptor.header())?;
    let mut chunk = zeroize::Zeroizing::new(vec![0u8; CHUNK_LEN]);
    let mut out = BytesMut::with_capacity(CHUNK_LEN + 2 * encryptor.frame_length());
    let mut total = 0u64;
    loop {
        let read = read_some(&mut input, &mut chunk)?;
        if read == 0 {
            break;
        }
        total += read as u64;
        encryptor.update(&chunk[..read], &mut out)?;
        output.write_all(&out)?;
        out.clear();
        progress(total);
    }
    encryptor.finish(&mut out);
    output.write_all(&out)?;
    output.flush()?;
    Ok(total)
}

/// Reads a message header from the start of `input`.
///
/// Returns the header and the bytes read past its end (the start of the body).
pub fn read_header<R: Read>(input: &mut R) -> Result<(ParsedHeader, Vec<u8>), StreamError> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(parsed) = ParsedHeader::parse(&buffer)? {
            let rest = buffer.split_off(parsed.len());
            return Ok((parsed, rest));
        }
        if buffer.len() >= MAX_HEADER_LEN {
            return Err(Error::Limit(format!("header longer than {MAX_HEADER_LEN} bytes")).into());
        }
        let read = read_some(input, &mut chunk)?;
        if read == 0 {
            return Err(Error::Truncated.into());
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
}

/// Decrypts a message body into `output`; returns the plaintext length.
///
/// `body_start` contains body bytes already read with the header. Each frame's plaintext is
/// written only after its tag verified, but a truncated message is detected only at the end:
/// when this fails, whatever reached `output` must be discarded by the caller.
pub fn decrypt_body<R: Read, W: Write>(
    mut decryptor: Decryptor,
    body_start: &[u8],
    mut input: R,
    mut output: W,
    mut progress: impl FnMut(u64),
) -> Result<u64, StreamError> {
    let mut out = BytesMut::with_capacity(CHUNK_LEN * 2);
    let mut total = 0u64;
    let mut chunk = vec![0u8; CHUNK_LEN];
    decryptor.update(body_start, &mut out)?;
    let mut consumed = body_start.len() as u64;
    loop {
        total += out.len() as u64;
        output.write_all(&out)?;
        zeroize::Zeroize::zeroize(&mut out[..]);
        out.clear();
        progress(consumed);

        let read = read_some(&mut input, &mut chunk)?;
        if read == 0 {
            break;
        }
        consumed += read as u64;
        decryptor.update(&chunk[..read], &mut out)?;
    }
    decryptor.finish()?;
    output.flush()?;
    Ok(total)
}

/// Proves a stored message's plaintext length by authenticating its final frame at the offset
/// the object size implies. Reads only the final frame.
pub fn verified_length<R: Read + Seek>(
    input: &mut R,
    parsed: &ParsedHeader,
    data_key: &DataKey,
    object_size: u64,
) -> Result<(Layout, u64), StreamError> {
    let layout = Layout::new(parsed, object_size)?;
    let plan = layout.final_frame_plan();
    let mut decryptor = Decryptor::for_range(parsed, data_key, &plan)?;
    let mut out = BytesMut::new();
    decryptor.update(&read_at(input, plan.ciphertext)?, &mut out)?;
    decryptor.finish()?;
    Ok((layout, decryptor.frames_opened()))
}

/// Decrypts the plaintext bytes `range` of a stored message, fetching and opening only the
/// frames that cover it, after proving the message's length by its final frame.
///
/// Returns the plaintext and the number of frames opened.
pub fn read_range<R: Read + Seek>(
    input: &mut R,
    parsed: &ParsedHeader,
    data_key: &DataKey,
    object_size: u64,
    range: Range<u64>,
) -> Result<(Vec<u8>, u64), StreamError> {
    let (layout, mut frames_opened) = verified_length(input, parsed, data_key, object_size)?;
    let plan = layout.plan(range)?;
    let mut decryptor = Decryptor::for_range(parsed, data_key, &plan)?;
    let mut out = BytesMut::new();
    decryptor.update(&read_at(input, plan.ciphertext.clone())?, &mut out)?;
    decryptor.finish()?;
    frames_opened += decryptor.frames_opened();
    Ok((out.to_vec(), frames_opened))
}

fn read_at<R: Read + Seek>(input: &mut R, range: Range<u64>) -> io::Result<Vec<u8>> {
    input.seek(SeekFrom::Start(range.start))?;
    let mut bytes = Vec::new();
    input
        .take(range.end - range.start)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Fills as much of `buffer` as the reader yields before end of input, retrying on interrupts.
fn read_some<R: Read>(input: &mut R, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match input.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}
