//! Random access: where each frame of a stored message sits, computed from the header and the
//! object size alone.
//!
//! With frame length F and header length H, regular frame n (1-based) starts at
//! `H + (n - 1) * (F + 32)`. For an object of C bytes let `B = C - H - 40`: there are
//! `k = B div (F + 32)` regular frames and the final frame holds `L = B mod (F + 32)` bytes,
//! valid only if `L <= F`. The plaintext length is `k * F + L`.
//!
//! The object size comes from storage and is not trusted: the length this computes is proven only
//! by authenticating the final frame at the offset it implies ([`Layout::final_frame_plan`]).

use std::ops::Range;

use super::frame::{FINAL_FRAME_OVERHEAD, REGULAR_FRAME_OVERHEAD};
use super::{Error, ParsedHeader};

/// The frame layout of one stored message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    header_len: u64,
    frame_length: u64,
    regular_frames: u64,
    final_length: u64,
}

/// The frames a range read must fetch and open, and what part of their plaintext to release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangePlan {
    /// The plaintext bytes released.
    pub plaintext: Range<u64>,
    /// The ciphertext bytes to fetch: whole frames, from `first_frame` to `last_frame`.
    pub ciphertext: Range<u64>,
    pub first_frame: u32,
    pub last_frame: u32,
    /// Whether `last_frame` is the message's final frame.
    pub last_is_final: bool,
    /// Plaintext bytes of `first_frame` before the range starts.
    pub skip: usize,
}

impl Layout {
    /// Computes the layout of a message whose header is `header` and whose stored object is
    /// `object_size` bytes long. Fails if no valid message has that size.
    pub fn new(header: &ParsedHeader, object_size: u64) -> Result<Self, Error> {
        let header_len = header.len() as u64;
        let frame_length = u64::from(header.header.frame_length);
        let stride = frame_length + REGULAR_FRAME_OVERHEAD as u64;

        let body = object_size
            .checked_sub(header_len + FINAL_FRAME_OVERHEAD as u64)
            .ok_or(Error::Truncated)?;
        let regular_frames = body / stride;
        let final_length = body % stride;
        if final_length > frame_length {
            return Err(Error::Malformed(
                "object size does not match a framed message",
            ));
        }
        if regular_frames >= u64::from(u32::MAX - 1) {
            return Err(Error::Malformed("object size implies too many frames"));
        }
        Ok(Layout {
            header_len,
            frame_length,
            regular_frames,
            final_length,
        })
    }

    /// Returns the plaintext length the object size implies, proven once the final frame verifies.
    pub fn plaintext_len(&self) -> u64 {
        self.regular_frames * self.frame_length + self.final_length
    }

    /// Returns the stored size of the whole message.
    pub fn object_size(&self) -> u64 {
        self.frame_start(self.final_sequence()) + self.final_length + FINAL_FRAME_OVERHEAD as u64
    }

    /// Returns the sequence number of the final frame.
    pub fn final_sequence(&self) -> u32 {
        // `new` bounds the frame count below u32::MAX.
        (self.regular_frames + 1) as u32
    }

    /// A plan that opens only the final frame and releases nothing: authenticating it proves
    /// the object size, and with it the plaintext length.
    pub fn final_frame_plan(&self) -> RangePlan {
        let sequence = self.final_sequence();
        let start = self.frame_start(sequence);
        let plaintext_end = self.plaintext_len();
        RangePlan {
            plaintext: plaintext_end..plaintext_end,
            ciphertext: start..self.object_size(),
            first_frame: sequence,
            last_frame: sequence,
            last_is_final: true,
            skip: self.final_length as usize,
        }
    }

    /// Plans a read of the plaintext bytes `range`, which must be non-empty and within
    /// [`Layout::plaintext_len`].
    pub fn plan(&self, range: Range<u64>) -> Result<RangePlan, Error> {
        if range.start >= range.end || range.end > self.plaintext_len() {
            return Err(Error::Range);
        }
        // Frame n covers plaintext [(n - 1) * F, n * F); the final frame takes what is left.
        let frame_of = |offset: u64| (offset / self.frame_length + 1).min(self.regular_frames + 1);
        let first = frame_of(range.start);
        let last = frame_of(range.end - 1);
        let last_is_final = last == self.regular_frames + 1;

        let end = if last_is_final {
            self.object_size()
        } else {
            self.frame_start(last as u32) + self.frame_length + REGULAR_FRAME_OVERHEAD as u64
        };
        Ok(RangePlan {
            ciphertext: self.frame_start(first as u32)..end,
            skip: (range.start - (first - 1) * self.frame_length) as usize,
            plaintext: range,
            first_frame: first as u32,
            last_frame: last as u32,
            last_is_final,
        })
    }

    /// Returns the ciphertext offset where frame `sequence` starts.
    fn frame_start(&self, sequence: u32) -> u64 {
        self.header_len
            + u64::from(sequence - 1) * (self.frame_length + REGULAR_FRAME_OVERHEAD as u64)
    }
}
