//! Human sizes and simple statistics shared by the bench commands.

/// Parses `4KiB`, `1MiB`, `1.5GiB`, `512`, `64KB` (KB/MB/GB are taken as powers of 1024 too,
/// as nixlbench does).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.trim().parse().map_err(|_| format!("bad size {s:?}"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1u64,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("unknown unit {other:?} in {s:?}")),
    };
    let v = n * mult as f64;
    if !(v >= 1.0 && v.fract() == 0.0) {
        return Err(format!("size {s:?} must be a whole number of bytes >= 1"));
    }
    Ok(v as u64)
}

pub fn parse_sizes(s: &str) -> Result<Vec<u64>, String> {
    s.split(',').filter(|p| !p.trim().is_empty()).map(parse_size).collect()
}

/// `1 MiB`, `4 KiB`, `1.5 GiB`, `100 B`.
pub fn human(n: u64) -> String {
    const U: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (name, f) in U {
        if n >= f {
            let v = n as f64 / f as f64;
            return if v.fract() == 0.0 {
                format!("{v} {name}")
            } else {
                format!("{v:.2} {name}")
            };
        }
    }
    format!("{n} B")
}

/// The `q`-quantile (0..=1) of sorted samples, nearest-rank.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4KiB").unwrap(), 4096);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("0").is_err());
        assert!(parse_size("1.5B").is_err());
        assert!(parse_size("3XB").is_err());
        assert_eq!(parse_sizes("4KiB,1MiB").unwrap(), vec![4096, 1 << 20]);
        assert_eq!(human(1 << 20), "1 MiB");
        assert_eq!(human(1536), "1.50 KiB");
    }

    #[test]
    fn quantiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[7.0], 0.5), 7.0);
    }
}
