//! Strict JSON input: objects whose fields are checked one by one so that every error names
//! its field, and exact money. Prices are read from the number's own text (serde_json's
//! `RawValue`) into integer cents, so `0.1` is ten cents and never a binary fraction.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::error::{Error, Result};

/// A JSON object's fields in document order, values still unparsed.
pub struct Object<'a> {
    fields: Vec<(String, &'a RawValue)>,
}

impl<'de> Deserialize<'de> for Object<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Object<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Object<'de>, A::Error> {
                let mut fields: Vec<(String, &'de RawValue)> = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, &'de RawValue>()? {
                    if fields.iter().any(|(name, _)| *name == k) {
                        return Err(serde::de::Error::custom(format!("duplicate field `{k}`")));
                    }
                    fields.push((k, v));
                }
                Ok(Object { fields })
            }
        }
        d.deserialize_map(V)
    }
}

impl<'a> Object<'a> {
    /// Parses a request body that must be one JSON object.
    pub fn parse(body: &'a [u8]) -> Result<Object<'a>> {
        let text = std::str::from_utf8(body)
            .map_err(|_| Error::bad_request("request body is not valid UTF-8"))?;
        Self::parse_str(text, "request body")
    }

    /// Parses `text` as a JSON object; `what` names it in errors.
    pub fn parse_str(text: &'a str, what: impl fmt::Display) -> Result<Object<'a>> {
        serde_json::from_str::<Object<'a>>(text).map_err(|e| {
            let msg = e.to_string();
            // serde_json appends " at line L column C"; keep that, it helps the client.
            if e.is_data() {
                Error::bad_request(format!("{what} must be a JSON object ({msg})"))
            } else {
                Error::bad_request(format!("{what} is not valid JSON ({msg})"))
            }
        })
    }

    /// Removes and returns field `name`, or fails naming it when it is missing or null.
    pub fn required(&mut self, name: &str, path: impl fmt::Display) -> Result<&'a RawValue> {
        match self.optional(name) {
            Some(v) => Ok(v),
            None => Err(Error::bad_request(format!("`{path}{name}` is required"))
                .with_field("field", format!("{path}{name}"))),
        }
    }

    /// Removes and returns field `name` unless it is absent or null.
    pub fn optional(&mut self, name: &str) -> Option<&'a RawValue> {
        let i = self.fields.iter().position(|(k, _)| k == name)?;
        let (_, v) = self.fields.remove(i);
        (v.get() != "null").then_some(v)
    }

    /// Fails naming the first field nobody took.
    pub fn finish(self, path: impl fmt::Display) -> Result<()> {
        match self.fields.first() {
            Some((k, _)) => Err(Error::bad_request(format!("unknown field `{path}{k}`"))
                .with_field("field", format!("{path}{k}"))),
            None => Ok(()),
        }
    }
}

fn field_error(field: impl fmt::Display, what: &str) -> Error {
    Error::bad_request(format!("`{field}` must be {what}")).with_field("field", field.to_string())
}

// The validators below take the field's name as `impl Display` and build every message
// only on failure: the happy path formats nothing (callgrind showed `fmt` at 11% of an
// order's instructions when these were eager).

/// A non-empty string (after trimming) of at most `chars_max` characters.
pub fn string(raw: &RawValue, field: impl fmt::Display, chars_max: usize) -> Result<String> {
    let fail = || {
        field_error(
            &field,
            &format!("a non-empty string of at most {chars_max} characters"),
        )
    };
    let s: String = serde_json::from_str(raw.get()).map_err(|_| fail())?;
    let s = s.trim();
    if s.is_empty() || s.chars().count() > chars_max || s.contains('\0') {
        return Err(fail());
    }
    Ok(s.to_string())
}

/// An integer in `min..=max`, written without fraction or exponent.
pub fn integer(raw: &RawValue, field: impl fmt::Display, min: i64, max: i64) -> Result<i64> {
    let fail = || field_error(&field, &format!("an integer from {min} to {max}"));
    let text = raw.get();
    let digits = text.strip_prefix('-').unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(fail());
    }
    match text.parse::<i64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(fail()),
    }
}

/// An amount of money greater than 0 and below `cents_max`, with at most two decimals,
/// returned in cents.
pub fn money(raw: &RawValue, field: impl fmt::Display, cents_max: i64) -> Result<i64> {
    match parse_cents(raw.get()) {
        Ok(c) if c > 0 && c < i128::from(cents_max) => Ok(c as i64),
        _ => Err(field_error(
            &field,
            &format!(
                "a number greater than 0 and below {} with at most 2 decimals",
                format_cents(cents_max)
            ),
        )),
    }
}

/// A field of one order line, `items[i].name`, formatted only when an error needs it.
#[derive(Clone, Copy)]
pub struct ItemField(pub usize, pub &'static str);

impl fmt::Display for ItemField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "items[{}].{}", self.0, self.1)
    }
}

/// Why a JSON number is not an amount in cents.
#[derive(Debug, PartialEq, Eq)]
pub enum CentsError {
    NotANumber,
    TooPrecise,
    OutOfRange,
}

/// Parses a JSON number's text exactly into cents: `12.5` → 1250, `1e2` → 10000,
/// `0.001` → `TooPrecise`. Magnitudes beyond 10^30 cents are `OutOfRange`.
pub fn parse_cents(text: &str) -> std::result::Result<i128, CentsError> {
    let (negative, rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text),
    };
    let (mantissa_text, exponent) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], parse_exponent(&rest[i + 1..])?),
        None => (rest, 0),
    };
    let (int_part, frac_part) = mantissa_text.split_once('.').unwrap_or((mantissa_text, ""));
    if int_part.is_empty()
        || !int_part.bytes().all(|b| b.is_ascii_digit())
        || !frac_part.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(CentsError::NotANumber);
    }
    if mantissa_text.contains('.') && frac_part.is_empty() {
        return Err(CentsError::NotANumber);
    }
    let mut digits: String = int_part.chars().chain(frac_part.chars()).collect();
    let trimmed = digits.trim_start_matches('0');
    if trimmed.is_empty() {
        return Ok(0);
    }
    digits = trimmed.to_string();
    // value = digits × 10^scale_to_cents, in cents.
    let scale_to_cents = exponent
        .saturating_sub(frac_part.len() as i64)
        .saturating_add(2);
    if scale_to_cents < 0 {
        let drop = usize::try_from(-scale_to_cents).unwrap_or(usize::MAX);
        let zeros = digits.len() - digits.trim_end_matches('0').len();
        if zeros < drop {
            return Err(CentsError::TooPrecise);
        }
        digits.truncate(digits.len() - drop);
    } else {
        let add = usize::try_from(scale_to_cents).unwrap_or(usize::MAX);
        if digits.len().saturating_add(add) > 30 {
            return Err(CentsError::OutOfRange);
        }
        digits.extend(std::iter::repeat_n('0', add));
    }
    if digits.len() > 30 {
        return Err(CentsError::OutOfRange);
    }
    let value: i128 = if digits.is_empty() {
        0
    } else {
        digits.parse().map_err(|_| CentsError::OutOfRange)?
    };
    Ok(if negative { -value } else { value })
}

fn parse_exponent(text: &str) -> std::result::Result<i64, CentsError> {
    let digits = text.strip_prefix(['+', '-']).unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CentsError::NotANumber);
    }
    // Saturate: an exponent beyond a million is out of range or too precise either way.
    let magnitude: i64 = digits.parse().unwrap_or(1_000_000).min(1_000_000);
    Ok(if text.starts_with('-') {
        -magnitude
    } else {
        magnitude
    })
}

/// Formats cents as a JSON number with two decimals: 8997 → `89.97`.
pub fn format_cents(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let abs = cents.unsigned_abs();
    format!("{sign}{}.{:02}", abs / 100, abs % 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cents_are_exact() {
        assert_eq!(parse_cents("89.97"), Ok(8997));
        assert_eq!(parse_cents("0.1"), Ok(10));
        assert_eq!(parse_cents("12"), Ok(1200));
        assert_eq!(parse_cents("1e2"), Ok(10000));
        assert_eq!(parse_cents("1.5E-1"), Ok(15));
        assert_eq!(parse_cents("-3.10"), Ok(-310));
        assert_eq!(parse_cents("0.00"), Ok(0));
        assert_eq!(parse_cents("1.230000"), Ok(123));
        assert_eq!(parse_cents("0.001"), Err(CentsError::TooPrecise));
        assert_eq!(parse_cents("1e400"), Err(CentsError::OutOfRange));
        assert_eq!(parse_cents("1e-400"), Err(CentsError::TooPrecise));
        assert_eq!(
            parse_cents("99999999999999999999999999999999"),
            Err(CentsError::OutOfRange)
        );
        assert_eq!(parse_cents("\"1\""), Err(CentsError::NotANumber));
        assert_eq!(parse_cents("true"), Err(CentsError::NotANumber));
    }

    #[test]
    fn formats_cents() {
        assert_eq!(format_cents(8997), "89.97");
        assert_eq!(format_cents(5), "0.05");
        assert_eq!(format_cents(100), "1.00");
    }

    #[test]
    fn objects_reject_duplicates_and_unknown_fields() {
        assert!(Object::parse(br#"{"a":1,"a":2}"#).is_err());
        let mut o = Object::parse(br#"{"a":1,"b":2}"#).unwrap();
        assert_eq!(o.required("a", "").unwrap().get(), "1");
        assert!(o.finish("").unwrap_err().message().contains("`b`"));
        assert!(Object::parse(b"[1]").is_err());
        assert!(Object::parse(b"{").is_err());
    }

    #[test]
    fn integers_are_strict() {
        let raw = |s: &str| serde_json::from_str::<Box<RawValue>>(s).unwrap();
        assert_eq!(integer(&raw("5"), "q", 1, 10).unwrap(), 5);
        assert!(integer(&raw("5.0"), "q", 1, 10).is_err());
        assert!(integer(&raw("\"5\""), "q", 1, 10).is_err());
        assert!(integer(&raw("1e1"), "q", 1, 10).is_err());
        assert!(integer(&raw("99999999999999999999999"), "q", 1, 10).is_err());
    }
}
