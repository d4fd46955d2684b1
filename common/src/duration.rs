//! Go-style durations (`250ms`, `5s`, `1h30m`): the one parser every tern
//! binary uses for flags and environment, and that reads what the CRDs admit
//! (`limits::DURATION_PATTERN`, checked by the API server with CEL's
//! `duration()`), so a value the schema accepts never fails at start-up.

use std::time::Duration;

/// Parses a positive duration: one or more number+unit pairs, units ns, us,
/// µs, ms, s, m, h; a decimal needs digits on both sides of the point
/// (`1.5s`). Nothing else: no sign, no spaces, no bare number, exactly
/// [`crate::limits::DURATION_PATTERN`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("`{text}` is not a duration such as 500ms, 5s, 2m or 1h30m");
    let digits = |s: &str| s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if text.is_empty() {
        return Err(bad());
    }
    let mut rest = text;
    let mut total = 0f64;
    while !rest.is_empty() {
        let whole = digits(rest);
        if whole == 0 {
            return Err(bad());
        }
        let mut number_len = whole;
        if rest[whole..].starts_with('.') {
            let fraction = digits(&rest[whole + 1..]);
            if fraction == 0 {
                return Err(bad());
            }
            number_len += 1 + fraction;
        }
        let (number, tail) = rest.split_at(number_len);
        let value: f64 = number.parse().map_err(|_| bad())?;
        // Longest unit first, so `ms` is not read as `m` followed by `s`.
        let (scale, unit_len) = [
            ("ns", 1e-9),
            ("us", 1e-6),
            ("µs", 1e-6),
            ("ms", 1e-3),
            ("s", 1.0),
            ("m", 60.0),
            ("h", 3600.0),
        ]
        .iter()
        .find(|(unit, _)| tail.starts_with(unit))
        .map(|(unit, scale)| (*scale, unit.len()))
        .ok_or_else(bad)?;
        total += value * scale;
        rest = &tail[unit_len..];
    }
    match Duration::try_from_secs_f64(total) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(format!("`{text}` must be a positive duration")),
        Err(_) => Err(format!("`{text}` is too long a duration")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2µs"), Ok(Duration::from_micros(2)));
        assert_eq!(parse_duration("1m1ms"), Ok(Duration::from_millis(60_001)));
        for bad in [
            "", "5", "ms", "5 s", " 5s", "-1s", "+1s", "0s", "soon", ".5s", "1.s", "1e3s", "5sec",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert!(parse_duration(&format!("{}h", "9".repeat(40))).is_err());
    }
}
