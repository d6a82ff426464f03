//! Bandwidth limits: rates as people write them, and token buckets.

use std::str::FromStr;
use std::time::Duration;

use tokio::time::Instant;

/// A rate in bytes per second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate(pub u64);

/// A rate that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("bad rate {0:?}: write e.g. 50mbit, 1gbit, 12MiB/s, 500KB/s or a number of bytes/s")]
pub struct ParseRateError(String);

impl FromStr for Rate {
    type Err = ParseRateError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseRateError(s.to_string());
        let t = s.trim();
        let t = t
            .strip_suffix("/s")
            .or_else(|| t.strip_suffix("ps"))
            .unwrap_or(t);
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: f64 = num.parse().map_err(|_| bad())?;
        let mult: f64 = match unit.trim() {
            "" | "B" => 1.0,
            "KB" | "kB" => 1e3,
            "MB" => 1e6,
            "GB" => 1e9,
            "KiB" => 1024.0,
            "MiB" => 1024.0 * 1024.0,
            "GiB" => 1024.0 * 1024.0 * 1024.0,
            "bit" => 1.0 / 8.0,
            "kbit" | "Kbit" => 1e3 / 8.0,
            "mbit" | "Mbit" => 1e6 / 8.0,
            "gbit" | "Gbit" => 1e9 / 8.0,
            _ => return Err(bad()),
        };
        let v = n * mult;
        if !(v >= 1.0 && v.is_finite()) {
            return Err(bad());
        }
        Ok(Rate(v as u64))
    }
}

/// A token bucket: `acquire(n)` returns once `n` bytes fit the rate. Debt is allowed, so a
/// large piece waits for its own time after it passes, and the long-run rate holds.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: tokio::sync::Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// A bucket for `rate` with a burst of 50 ms of traffic (at least 64 KiB).
    pub fn new(rate: Rate) -> Self {
        let r = rate.0 as f64;
        let burst = (r * 0.05).max(65_536.0);
        TokenBucket {
            rate: r,
            burst,
            state: tokio::sync::Mutex::new((burst, Instant::now())),
        }
    }

    /// The rate.
    pub fn rate(&self) -> Rate {
        Rate(self.rate as u64)
    }

    /// Takes `n` tokens, waiting as long as the rate needs.
    pub async fn acquire(&self, n: u64) {
        let wait = {
            let mut st = self.state.lock().await;
            let now = Instant::now();
            let refill = now.duration_since(st.1).as_secs_f64() * self.rate;
            st.0 = (st.0 + refill).min(self.burst) - n as f64;
            st.1 = now;
            if st.0 < 0.0 {
                Duration::from_secs_f64(-st.0 / self.rate)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_rates() {
        assert_eq!("50mbit".parse::<Rate>().unwrap(), Rate(6_250_000));
        assert_eq!("12MiB/s".parse::<Rate>().unwrap(), Rate(12 << 20));
        assert_eq!("1000".parse::<Rate>().unwrap(), Rate(1000));
        assert_eq!("1.5GB".parse::<Rate>().unwrap(), Rate(1_500_000_000));
        for bad in ["", "fast", "0", "10 parsecs", "-5MB"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bucket_holds_the_rate() {
        let b = TokenBucket::new(Rate(1_000_000));
        let start = tokio::time::Instant::now();
        for _ in 0..10 {
            b.acquire(500_000).await;
        }
        // 5 MB at 1 MB/s, less the initial burst.
        let t = start.elapsed().as_secs_f64();
        assert!((4.8..=5.1).contains(&t), "{t}");
    }
}
