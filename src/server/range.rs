//! The `Range` request header (RFC 9110, section 14.2), for a single byte range.

use std::ops::Range;

/// The part of a representation of `length` bytes that a `Range` header requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeRequest {
    /// No usable `Range` header: serve the whole representation with 200. This includes
    /// syntactically invalid headers, other units and multiple ranges, which RFC 9110 lets a
    /// server ignore.
    Whole,
    /// Serve these bytes with 206.
    Partial(Range<u64>),
    /// No byte of the range exists: respond with 416 with `Content-Range: bytes */length`.
    Unsatisfiable,
}

/// Interprets a `Range` header value against a representation of `length` bytes.
pub fn parse(header: Option<&[u8]>, length: u64) -> RangeRequest {
    let Some(spec) = header
        .and_then(|value| std::str::from_utf8(value).ok())
        .and_then(|value| strip_unit(value.trim()))
    else {
        return RangeRequest::Whole;
    };
    if spec.contains(',') {
        return RangeRequest::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeRequest::Whole;
    };
    let (first, last) = (first.trim(), last.trim());

    if first.is_empty() {
        // Suffix range: the last N bytes.
        let Some(suffix) = parse_number(last) else {
            return RangeRequest::Whole;
        };
        if suffix == 0 || length == 0 {
            return RangeRequest::Unsatisfiable;
        }
        return RangeRequest::Partial(length.saturating_sub(suffix)..length);
    }

    let Some(first) = parse_number(first) else {
        return RangeRequest::Whole;
    };
    let last = if last.is_empty() {
        None
    } else {
        match parse_number(last) {
            Some(last) if last >= first => Some(last),
            _ => return RangeRequest::Whole,
        }
    };
    if first >= length {
        return RangeRequest::Unsatisfiable;
    }
    let end = last.map_or(length, |last| last.saturating_add(1).min(length));
    RangeRequest::Partial(first..end)
}

/// Returns the range set after `bytes=`; the unit is case-insensitive.
fn strip_unit(value: &str) -> Option<&str> {
    let (unit, spec) = value.split_once('=')?;
    unit.trim().eq_ignore_ascii_case("bytes").then_some(spec)
}

fn parse_number(digits: &str) -> Option<u64> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(value: &str, length: u64) -> RangeRequest {
        parse(Some(value.as_bytes()), length)
    }

    #[test]
    fn absent_header_means_whole() {
        assert_eq!(parse(None, 10), RangeRequest::Whole);
    }

    #[test]
    fn closed_and_open_ranges() {
        assert_eq!(range("bytes=0-0", 10), RangeRequest::Partial(0..1));
        assert_eq!(range("bytes=9-9", 10), RangeRequest::Partial(9..10));
        assert_eq!(range("bytes=2-5", 10), RangeRequest::Partial(2..6));
        assert_eq!(range("bytes=4-", 10), RangeRequest::Partial(4..10));
        assert_eq!(range("bytes=4-100", 10), RangeRequest::Partial(4..10));
        assert_eq!(range("Bytes = 1-2", 10), RangeRequest::Partial(1..3));
    }

    #[test]
    fn suffix_ranges() {
        assert_eq!(range("bytes=-3", 10), RangeRequest::Partial(7..10));
        assert_eq!(range("bytes=-10", 10), RangeRequest::Partial(0..10));
        assert_eq!(range("bytes=-11", 10), RangeRequest::Partial(0..10));
        assert_eq!(range("bytes=-0", 10), RangeRequest::Unsatisfiable);
        assert_eq!(range("bytes=-5", 0), RangeRequest::Unsatisfiable);
    }

    #[test]
    fn past_the_end_is_unsatisfiable() {
        assert_eq!(range("bytes=10-", 10), RangeRequest::Unsatisfiable);
        assert_eq!(range("bytes=10-20", 10), RangeRequest::Unsatisfiable);
        assert_eq!(range("bytes=0-", 0), RangeRequest::Unsatisfiable);
    }

    #[test]
    fn unusable_headers_are_ignored() {
        for value in [
            "items=0-1",
            "bytes=5-2",
            "bytes=a-b",
            "bytes=0-1,3-4",
            "bytes=",
            "bytes=-",
            "0-1",
            "bytes=1",
        ] {
            assert_eq!(range(value, 10), RangeRequest::Whole, "{value}");
        }
        assert_eq!(parse(Some(&[0xff, 0xfe]), 10), RangeRequest::Whole);
    }

    #[test]
    fn huge_numbers_do_not_overflow() {
        assert_eq!(
            range("bytes=0-18446744073709551615", 10),
            RangeRequest::Partial(0..10)
        );
        assert_eq!(
            range("bytes=0-99999999999999999999999", 10),
            RangeRequest::Whole
        );
    }
}
