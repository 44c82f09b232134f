//! `pmivmm bench ...`: benchmarks that print tables (performance claims live
//! here, not in timed tests).

pub mod boot;
pub mod channel;
pub mod checkpoint;
pub mod cluster;
pub mod migrate;

/// Minimum and median of a sample (None when empty).
pub fn min_median(mut v: Vec<f64>) -> Option<(f64, f64)> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let median = if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 };
    Some((v[0], median))
}

#[cfg(test)]
mod tests {
    #[test]
    fn min_median() {
        assert_eq!(super::min_median(vec![]), None);
        assert_eq!(super::min_median(vec![3.0, 1.0, 2.0]), Some((1.0, 2.0)));
        assert_eq!(super::min_median(vec![4.0, 1.0, 2.0, 3.0]), Some((1.0, 2.5)));
    }
}
