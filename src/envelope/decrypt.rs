//! The streaming decryptor: frames in, verified plaintext out.
//!
//! Plaintext reaches the caller's buffer only after its frame's tag verified: a frame is
//! decrypted in place in the output buffer and cut off again (its bytes zeroized) if
//! authentication fails. Truncation is detected only at the end, so a caller that streams the
//! plaintext onwards must call [`Decryptor::finish`] and abort its own output if that fails.

use bytes::BytesMut;
use zeroize::Zeroizing;

use super::frame::{self, FINAL_FRAME_MARKER, FrameCipher, FrameKind, frame_iv};
use super::{Error, IV_LEN, ParsedHeader, RangePlan, TAG_LEN};
use crate::keys::DataKey;

/// Decrypts the body of one message: all of it, or the frames of a [`RangePlan`].
pub struct Decryptor {
    opener: Opener,
    /// Bytes of a frame that arrived split across calls; zeroized on drop since a frame is
    /// decrypted in place only after it is complete, but callers may hand in anything.
    buffer: Zeroizing<Vec<u8>>,
}

/// The cipher and the frame-order state: which sequence number comes next and when to stop.
struct Opener {
    cipher: FrameCipher,
    frame_length: usize,
    next_sequence: u32,
    window: Option<Window>,
    done: bool,
    frames_opened: u64,
}

/// The part of the plaintext that a range read releases.
#[derive(Debug, Clone, Copy)]
struct Window {
    last_frame: u32,
    last_is_final: bool,
    /// Plaintext bytes still to drop from the start of the next frame opened.
    skip: usize,
    /// Plaintext bytes still to release.
    remaining: u64,
}

impl Decryptor {
    /// Prepares to decrypt a whole message body, after checking the header's commitment key
    /// and authentication tag against `data_key`.
    pub fn new(parsed: &ParsedHeader, data_key: &DataKey) -> Result<Self, Error> {
        Self::start(parsed, data_key, 1, None)
    }

    /// Prepares to decrypt only the frames `plan` names, releasing only its plaintext range.
    ///
    /// The caller feeds exactly the ciphertext bytes `plan.ciphertext`. The final frame's
    /// authenticity is not checked here unless the range includes it: verify it first with
    /// [`super::Layout::final_frame_plan`].
    pub fn for_range(
        parsed: &ParsedHeader,
        data_key: &DataKey,
        plan: &RangePlan,
    ) -> Result<Self, Error> {
        let window = Window {
            last_frame: plan.last_frame,
            last_is_final: plan.last_is_final,
            skip: plan.skip,
            remaining: plan.plaintext.end - plan.plaintext.start,
        };
        Self::start(parsed, data_key, plan.first_frame, Some(window))
    }

    fn start(
        parsed: &ParsedHeader,
        data_key: &DataKey,
        first_frame: u32,
        window: Option<Window>,
    ) -> Result<Self, Error> {
        let header = &parsed.header;
        let (cipher, commitment) = FrameCipher::derive(data_key, &header.message_id);
        frame::verify_commitment(&commitment, &header.commitment)?;
        cipher.verify_header(&parsed.body, &parsed.tag)?;

        let frame_length = header.frame_length as usize;
        let opener = Opener {
            cipher,
            frame_length,
            next_sequence: first_frame,
            window,
            done: false,
            frames_opened: 0,
        };
        Ok(Decryptor {
            opener,
            buffer: Zeroizing::new(Vec::new()),
        })
    }

    /// Consumes ciphertext and appends the plaintext of every frame it completes to `out`.
    ///
    /// On error nothing of the failing frame is left in `out`, and the decryptor must not be
    /// used again.
    pub fn update(&mut self, mut input: &[u8], out: &mut BytesMut) -> Result<(), Error> {
        let frame_length = self.opener.frame_length;
        while !input.is_empty() {
            if self.opener.done {
                return Err(Error::TrailingData);
            }

            // Fast path: a whole frame at the start of `input` is opened without buffering.
            if self.buffer.is_empty()
                && let Some(size) = frame::frame_size(input, frame_length)?
                && input.len() >= size
            {
                let (frame, rest) = input.split_at(size);
                self.opener.open(frame, out)?;
                input = rest;
                continue;
            }

            // Otherwise gather the frame. Until its size is known, take no more than the
            // shortest possible frame, so no byte of the next frame is taken.
            let target =
                frame::frame_size(&self.buffer, frame_length)?.unwrap_or(frame::FINAL_FRAME_PREFIX);
            let take = (target - self.buffer.len()).min(input.len());
            let (head, rest) = input.split_at(take);
            if self.buffer.capacity() == 0 {
                self.buffer
                    .reserve_exact(frame_length + frame::FINAL_FRAME_OVERHEAD);
            }
            self.buffer.extend_from_slice(head);
            input = rest;

            if frame::frame_size(&self.buffer, frame_length)? == Some(self.buffer.len()) {
                self.opener.open(&self.buffer, out)?;
                self.buffer.clear();
            }
        }
        Ok(())
    }

    /// Checks that the message (or the planned range) ended where it must: a missing final
    /// frame or a partial frame means the message was truncated.
    pub fn finish(&self) -> Result<(), Error> {
        if !self.opener.done || !self.buffer.is_empty() {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    /// True once the final frame (or the last planned frame) has been opened.
    pub fn is_done(&self) -> bool {
        self.opener.done
    }

    /// Returns how many frames this decryptor has authenticated.
    pub fn frames_opened(&self) -> u64 {
        self.opener.frames_opened
    }
}

impl Opener {
    /// Opens one complete frame and appends its plaintext (or the planned part of it) to `out`.
    fn open(&mut self, frame: &[u8], out: &mut BytesMut) -> Result<(), Error> {
        let parts = split_frame(frame)?;
        if parts.sequence != self.next_sequence {
            return Err(Error::Malformed("frame sequence number out of order"));
        }
        if parts.iv != frame_iv(parts.sequence) {
            return Err(Error::Malformed(
                "frame IV does not match its sequence number",
            ));
        }
        if let Some(window) = &self.window {
            let is_last = parts.sequence == window.last_frame;
            if is_last && window.last_is_final != (parts.kind == FrameKind::Final) {
                return Err(Error::Malformed(
                    "final frame not where the object size puts it",
                ));
            }
            if !is_last && parts.kind == FrameKind::Final {
                return Err(Error::Malformed(
                    "final frame not where the object size puts it",
                ));
            }
        }

        let start = out.len();
        out.extend_from_slice(parts.content);
        if let Err(error) =
            self.cipher
                .open(parts.kind, parts.sequence, &mut out[start..], parts.tag)
        {
            out.truncate(start);
            return Err(error);
        }
        self.frames_opened += 1;
        self.release_window(out, start);

        let last_planned = self.window.is_some_and(|w| w.last_frame == parts.sequence);
        if parts.kind == FrameKind::Final || last_planned {
            self.done = true;
        } else {
            self.next_sequence = self
                .next_sequence
                .checked_add(1)
                .ok_or(Error::Malformed("too many frames"))?;
        }
        Ok(())
    }

    /// In a range read, cuts the just-opened plaintext at `out[start..]` down to the window.
    fn release_window(&mut self, out: &mut BytesMut, start: usize) {
        let Some(window) = &mut self.window else {
            return;
        };
        let opened = out.len() - start;
        let skip = window.skip.min(opened);
        let keep = ((opened - skip) as u64).min(window.remaining) as usize;
        if skip > 0 {
            out.copy_within(start + skip..start + skip + keep, start);
        }
        // Zeroize the plaintext outside the window before dropping it from `out`.
        out[start + keep..].fill(0);
        out.truncate(start + keep);
        window.skip -= skip;
        window.remaining -= keep as u64;
    }
}

struct FrameParts<'a> {
    kind: FrameKind,
    sequence: u32,
    iv: &'a [u8],
    content: &'a [u8],
    tag: &'a [u8; TAG_LEN],
}

/// Splits a complete frame, as sized by [`frame::frame_size`], into its fields.
fn split_frame(frame: &[u8]) -> Result<FrameParts<'_>, Error> {
    let too_short = Error::Malformed("frame too short");
    let (body, tag) = frame.split_last_chunk::<TAG_LEN>().ok_or(too_short)?;
    let (marker, rest) = body.split_first_chunk::<4>().ok_or(Error::Truncated)?;
    let marker = u32::from_be_bytes(*marker);

    if marker != FINAL_FRAME_MARKER {
        let (iv, content) = rest.split_at_checked(IV_LEN).ok_or(Error::Truncated)?;
        return Ok(FrameParts {
            kind: FrameKind::Regular,
            sequence: marker,
            iv,
            content,
            tag,
        });
    }
    let (sequence, rest) = rest.split_first_chunk::<4>().ok_or(Error::Truncated)?;
    let (iv, rest) = rest.split_at_checked(IV_LEN).ok_or(Error::Truncated)?;
    // The length field was checked against the frame size when the frame was sized.
    let (_length, content) = rest.split_first_chunk::<4>().ok_or(Error::Truncated)?;
    Ok(FrameParts {
        kind: FrameKind::Final,
        sequence: u32::from_be_bytes(*sequence),
        iv,
        content,
        tag,
    })
}
