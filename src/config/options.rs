//! Parser for `key=value,key=value` device specifications (`--blk socket=...,path=...`).
//!
//! Behaviour: keys are case-sensitive, values may not contain commas, a bare key (`readonly`)
//! means `key=on`, and a key given twice is an error. Callers take values out with the typed
//! getters and finish with [`OptionList::finish`], which rejects any key nobody asked for, so a
//! typo never silently becomes a default.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::collections::BTreeMap;
use std::str::FromStr;

/// Errors from parsing a `key=value` list.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionError {
    /// A key appeared twice.
    #[error("option `{0}` given more than once")]
    Duplicate(String),
    /// An element had an empty key (`=x` or `,,`).
    #[error("empty option name in `{0}`")]
    EmptyKey(String),
    /// A key nobody consumed.
    #[error("unknown option `{0}`")]
    Unknown(String),
    /// A required key was missing.
    #[error("missing required option `{0}`")]
    Missing(&'static str),
    /// A value did not parse.
    #[error("bad value `{value}` for `{key}`: {reason}")]
    Invalid {
        /// The option name.
        key: String,
        /// The value as given.
        value: String,
        /// Why it was refused.
        reason: String,
    },
}

/// A parsed option list whose values are taken out one by one.
#[derive(Debug)]
pub struct OptionList {
    values: BTreeMap<String, String>,
}

impl OptionList {
    /// Splits `spec` into keys and values.
    pub fn parse(spec: &str) -> Result<Self, OptionError> {
        let mut values = BTreeMap::new();
        for item in spec.split(',').filter(|item| !item.is_empty()) {
            let (key, value) = match item.split_once('=') {
                Some((key, value)) => (key.trim(), value.trim()),
                None => (item.trim(), "on"),
            };
            if key.is_empty() {
                return Err(OptionError::EmptyKey(item.to_string()));
            }
            if values.insert(key.to_string(), value.to_string()).is_some() {
                return Err(OptionError::Duplicate(key.to_string()));
            }
        }
        Ok(Self { values })
    }

    /// Builds a list from already separated pairs (the control plane's named parameters).
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        Self {
            values: pairs.into_iter().collect(),
        }
    }

    /// The pairs not taken yet.
    pub fn into_pairs(self) -> BTreeMap<String, String> {
        self.values
    }

    /// Takes a raw string value.
    pub fn take_str(&mut self, key: &str) -> Option<String> {
        self.values.remove(key)
    }

    /// Takes a value and parses it with `FromStr`.
    pub fn take<T>(&mut self, key: &str) -> Result<Option<T>, OptionError>
    where
        T: FromStr,
        T::Err: std::fmt::Display,
    {
        match self.values.remove(key) {
            None => Ok(None),
            Some(value) => value
                .parse()
                .map(Some)
                .map_err(|e: T::Err| OptionError::Invalid {
                    key: key.to_string(),
                    value: value.clone(),
                    reason: e.to_string(),
                }),
        }
    }

    /// Whether `key` was given (and not taken yet).
    pub fn contains(&self, key: &str) -> bool {
        self.values.contains_key(key)
    }

    /// Takes a boolean: `on|off|true|false|yes|no|1|0`.
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>, OptionError> {
        match self.values.remove(key) {
            None => Ok(None),
            Some(value) => match value.as_str() {
                "on" | "true" | "yes" | "1" => Ok(Some(true)),
                "off" | "false" | "no" | "0" => Ok(Some(false)),
                _ => Err(OptionError::Invalid {
                    key: key.to_string(),
                    value,
                    reason: "expected on/off".to_string(),
                }),
            },
        }
    }

    /// Takes a duration value (`30s`, `10m`, `2h`, `500ms`).
    pub fn take_duration(&mut self, key: &str) -> Result<Option<std::time::Duration>, OptionError> {
        match self.take_str(key) {
            None => Ok(None),
            Some(value) => {
                parse_duration(&value)
                    .map(Some)
                    .map_err(|reason| OptionError::Invalid {
                        key: key.to_string(),
                        value,
                        reason,
                    })
            }
        }
    }

    /// Takes a byte size such as `4096`, `512K`, `20G` (binary units).
    pub fn take_size(&mut self, key: &str) -> Result<Option<u64>, OptionError> {
        match self.values.remove(key) {
            None => Ok(None),
            Some(value) => parse_size(&value)
                .map(Some)
                .map_err(|reason| OptionError::Invalid {
                    key: key.to_string(),
                    value,
                    reason,
                }),
        }
    }

    /// Fails if any key was left unconsumed.
    pub fn finish(self) -> Result<(), OptionError> {
        match self.values.into_keys().next() {
            Some(key) => Err(OptionError::Unknown(key)),
            None => Ok(()),
        }
    }
}

/// Parses `123`, `4k`, `512M`, `20G`, `1T` into bytes, refusing overflow.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size suffix `{c}`")),
            };
            (&text[..i], shift)
        }
        _ => (text, 0),
    };
    let number: u64 = digits
        .parse()
        .map_err(|_| "expected a number with an optional K/M/G/T suffix".to_string())?;
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| "size overflows 64 bits".to_string())
}

/// Parses `10m`, `30s`, `500ms`, `2h`.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("`{text}` is not a duration like 30s, 10m, 2h or 500ms");
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "ms" => return Ok(std::time::Duration::from_millis(n)),
        "s" => n,
        "m" => n.checked_mul(60).ok_or_else(bad)?,
        "h" => n.checked_mul(3600).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    Ok(std::time::Duration::from_secs(seconds))
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
mod tests {
    use std::time::Duration;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        for bad in ["", "m", "10", "10x", "-1s", "99999999999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    use super::*;

    #[test]
    fn parses_pairs_and_bare_flags() {
        let mut list = OptionList::parse("socket=/s.sock,readonly,queues=2").unwrap();
        assert_eq!(list.take_str("socket").as_deref(), Some("/s.sock"));
        assert_eq!(list.take_bool("readonly").unwrap(), Some(true));
        assert_eq!(list.take::<u16>("queues").unwrap(), Some(2));
        list.finish().unwrap();
    }

    #[test]
    fn rejects_duplicates_unknown_and_empty_keys() {
        assert_eq!(
            OptionList::parse("a=1,a=2").unwrap_err(),
            OptionError::Duplicate("a".into())
        );
        assert!(matches!(
            OptionList::parse("=1"),
            Err(OptionError::EmptyKey(_))
        ));
        let list = OptionList::parse("typo=1").unwrap();
        assert_eq!(list.finish(), Err(OptionError::Unknown("typo".into())));
    }

    #[test]
    fn bad_values_name_the_key() {
        let mut list = OptionList::parse("queues=many,ro=maybe").unwrap();
        let err = list.take::<u16>("queues").unwrap_err();
        assert!(err.to_string().contains("queues"), "{err}");
        assert!(list.take_bool("ro").is_err());
    }

    #[test]
    fn sizes_with_suffixes_and_overflow() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("20G"), Ok(20 << 30));
        assert!(parse_size("16777216T").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("-1").is_err());
    }
}
