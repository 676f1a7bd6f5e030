//! Rate limits for the devices: Firecracker's token buckets (`size`, `one_time_burst`,
//! `refill_time` in milliseconds), one for bytes (`bandwidth`) and one for operations.
//!
//! In JSON they are written as in Firecracker's API. On the command line they are keys of the
//! device's flag: `bw_size=`, `bw_one_time_burst=`, `bw_refill_time=`, `ops_size=`, ...,
//! prefixed with `rx_` or `tx_` for a network device.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// One token bucket.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Tokens the bucket holds: bytes, or operations.
    pub size: u64,
    /// Tokens granted once, on top of the bucket, used first.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub one_time_burst: u64,
    /// Milliseconds to refill an empty bucket.
    pub refill_time: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A device's (or one direction's) limits.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketConfig>,
}

impl RateLimiterConfig {
    /// Sets one flag key (`bw_size`, `ops_refill_time`, ...) of this limiter. Ok(false) when
    /// `key` is not a rate-limit key; an error when its value is not a number.
    pub fn set_flag_key(
        limiter: &mut Option<RateLimiterConfig>,
        key: &str,
        value: &str,
        flag: &str,
    ) -> Result<bool, ConfigError> {
        let Some((bucket, field)) = key
            .strip_prefix("bw_")
            .map(|f| (Bucket::Bandwidth, f))
            .or_else(|| key.strip_prefix("ops_").map(|f| (Bucket::Ops, f)))
        else {
            return Ok(false);
        };
        if !matches!(field, "size" | "one_time_burst" | "refill_time") {
            return Ok(false);
        }
        let n: u64 = value.parse().map_err(|_| ConfigError::RateLimit {
            device: flag.to_string(),
            why: format!("{key}={value} is not a whole number"),
        })?;
        let l = limiter.get_or_insert_with(Default::default);
        let b = match bucket {
            Bucket::Bandwidth => l.bandwidth.get_or_insert_with(Default::default),
            Bucket::Ops => l.ops.get_or_insert_with(Default::default),
        };
        match field {
            "size" => b.size = n,
            "one_time_burst" => b.one_time_burst = n,
            _ => b.refill_time = n,
        }
        Ok(true)
    }

    /// Checks each bucket has a size and a refill time; `device` names it in messages.
    pub fn validate(limiter: Option<Self>, device: &str) -> Result<Option<Self>, ConfigError> {
        let Some(l) = limiter else {
            return Ok(None);
        };
        for (name, bucket) in [("bandwidth", l.bandwidth), ("ops", l.ops)] {
            if let Some(b) = bucket {
                if b.size == 0 || b.refill_time == 0 {
                    return Err(ConfigError::RateLimit {
                        device: device.to_string(),
                        why: format!(
                            "the {name} bucket needs a size and a refill_time above 0 (leave the bucket out for no limit)"
                        ),
                    });
                }
            }
        }
        Ok((l.bandwidth.is_some() || l.ops.is_some()).then_some(l))
    }
}

enum Bucket {
    Bandwidth,
    Ops,
}

/// `bw_size=BYTES,bw_refill_time=MS,...` on its own (`--rng-limit`).
impl std::str::FromStr for RateLimiterConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut limiter = None;
        for part in s.split(',') {
            let bad = || {
                ConfigError::RateLimit {
                device: s.to_string(),
                why: format!("{part:?} is not bw_size, bw_one_time_burst, bw_refill_time, ops_size, ops_one_time_burst or ops_refill_time with a value"),
            }
            };
            let (key, value) = part.split_once('=').ok_or_else(bad)?;
            if !RateLimiterConfig::set_flag_key(&mut limiter, key, value, s)? {
                return Err(bad());
            }
        }
        Ok(limiter.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_keys_fill_the_buckets_and_other_keys_are_left_alone() {
        let mut l = None;
        for (k, v) in [
            ("bw_size", "1000"),
            ("bw_refill_time", "100"),
            ("ops_size", "5"),
            ("ops_one_time_burst", "7"),
            ("ops_refill_time", "1000"),
        ] {
            assert!(RateLimiterConfig::set_flag_key(&mut l, k, v, "--disk").unwrap());
        }
        assert!(!RateLimiterConfig::set_flag_key(&mut l, "id", "x", "--disk").unwrap());
        assert!(!RateLimiterConfig::set_flag_key(&mut l, "bw_speed", "1", "--disk").unwrap());
        assert!(RateLimiterConfig::set_flag_key(&mut l, "bw_size", "-1", "--disk").is_err());
        let l = RateLimiterConfig::validate(l, "disk0").unwrap().unwrap();
        assert_eq!(
            l.bandwidth,
            Some(TokenBucketConfig {
                size: 1000,
                one_time_burst: 0,
                refill_time: 100
            })
        );
        assert_eq!(l.ops.map(|o| (o.size, o.one_time_burst)), Some((5, 7)));
    }

    #[test]
    fn a_bucket_without_size_or_refill_time_is_refused() {
        let no_refill = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 10,
                one_time_burst: 0,
                refill_time: 0,
            }),
            ops: None,
        };
        let e = RateLimiterConfig::validate(Some(no_refill), "disk0").unwrap_err();
        assert!(e.to_string().contains("disk0"), "{e}");
        assert_eq!(
            RateLimiterConfig::validate(Some(RateLimiterConfig::default()), "disk0").unwrap(),
            None
        );
    }
}
