//! Exact sums of `f64` values, for window aggregates that add each event when it enters a
//! window and subtract it when it leaves.
//!
//! A float sum kept by adding and subtracting drifts from a fresh sum of the same values, and
//! its result depends on the order of the operations, so a window's sum would depend on the
//! key's whole past (and differ after a restore). [`ExactSum`] holds the sum exactly, as a
//! fixed-point integer over the whole `f64` range (Neal's "small superaccumulator", 2015):
//! 32-bit digits in `i64` cells, so carries can wait for 2^30 additions. Its value, rounded
//! once to the nearest `f64`, is a function of the multiset of values it holds and of nothing
//! else. Only the digits a key's values touch are stored (two or three for payment amounts).
//!
//! While every value a sum has held is an integer (amounts in minor units), it is kept as an
//! `i128` instead, which is as exact and cheaper; the first other value moves it to the digits.
//! The rounded value is kept until the sum changes, so features that read one sum (mean, std
//! and ratio of a window) round it once.

/// Bits per digit.
const DIGIT_BITS: u32 = 32;
const DIGIT_MASK: u128 = (1 << DIGIT_BITS) - 1;
/// Additions between two carry propagations: each adds less than 2^32 to a digit, so a cell
/// (an `i64` that holds less than 2^32 after propagation) cannot overflow.
const CARRY_EVERY: u32 = 1 << 30;
/// The value of digit 0's lowest bit is 2^-1074, the smallest subnormal.
const LOWEST_EXPONENT: i32 = -1074;

/// An exact sum of finite `f64` values; see the module documentation.
#[derive(Debug, Clone, Default)]
pub struct ExactSum {
    /// `digits[i]` is a signed multiple of 2^(32 * (lo + i) - 1074).
    digits: Vec<i64>,
    lo: u32,
    /// Additions since the last carry propagation.
    pending: u32,
    /// Infinite values held (a square that overflowed), positive and negative.
    infinite: [u32; 2],
    /// While `mixed` is false, the sum (every value held so far an integer below 2^62 in
    /// magnitude, the digits empty).
    int: i128,
    /// A value other than such an integer was held since the last [`ExactSum::clear`]: the sum
    /// is in the digits.
    mixed: bool,
    /// The value, rounded, until the sum changes.
    rounded: Option<f64>,
}

/// Integers below this magnitude are summed as `i128` (an `i64` holds them, and 2^30 of them
/// sum far inside an `i128`).
const INTEGER_BELOW: f64 = 4_611_686_018_427_387_904.0; // 2^62

impl ExactSum {
    /// Adds `x` (an infinity makes the sum infinite while it is held; NaN is ignored: inputs
    /// are checked before).
    #[inline]
    pub fn add(&mut self, x: f64) {
        self.put(x, false);
    }

    /// Subtracts `x`, an amount added before.
    #[inline]
    pub fn sub(&mut self, x: f64) {
        self.put(x, true);
    }

    /// Empties the sum.
    pub fn clear(&mut self) {
        self.digits.clear();
        self.lo = 0;
        self.pending = 0;
        self.infinite = [0, 0];
        self.int = 0;
        self.mixed = false;
        self.rounded = None;
    }

    #[inline]
    fn put(&mut self, x: f64, subtract: bool) {
        self.rounded = None;
        if !self.mixed {
            if x.abs() < INTEGER_BELOW && x == (x as i64) as f64 {
                let v = i128::from(x as i64);
                self.int += if subtract { -v } else { v };
                return;
            }
            // The first other value: the integers' sum moves to the digits, as two exact
            // halves (it is below 2^93).
            self.mixed = true;
            let int = std::mem::take(&mut self.int);
            let magnitude = int.unsigned_abs();
            let high = ((magnitude >> 52) as f64) * 4_503_599_627_370_496.0; // 2^52
            let low = (magnitude & ((1 << 52) - 1)) as f64;
            self.put_digits(high, int < 0);
            self.put_digits(low, int < 0);
        }
        self.put_digits(x, subtract);
    }

    #[inline]
    fn put_digits(&mut self, x: f64, subtract: bool) {
        let bits = x.to_bits();
        let biased = ((bits >> 52) & 0x7ff) as u32;
        let fraction = bits & ((1 << 52) - 1);
        if biased == 0x7ff {
            if fraction == 0 {
                let held = &mut self.infinite[usize::from(bits >> 63 == 1)];
                *held = if subtract {
                    held.saturating_sub(1)
                } else {
                    held.saturating_add(1)
                };
            }
            return;
        }
        if biased == 0 && fraction == 0 {
            return;
        }
        // x = mantissa * 2^(p - 1074), p in 0..=2045.
        let (mantissa, p) = if biased == 0 {
            (fraction, 0)
        } else {
            (fraction | (1 << 52), biased - 1)
        };
        let first = p / DIGIT_BITS;
        let v = u128::from(mantissa) << (p % DIGIT_BITS);
        let pieces = [
            (v & DIGIT_MASK) as i64,
            ((v >> DIGIT_BITS) & DIGIT_MASK) as i64,
            (v >> (2 * DIGIT_BITS)) as i64,
        ];
        let at = self.reserve(first, first + 2);
        let negative = (bits >> 63 == 1) != subtract;
        for (cell, piece) in self.digits[at..at + 3].iter_mut().zip(pieces) {
            if negative {
                *cell -= piece;
            } else {
                *cell += piece;
            }
        }
        self.pending += 1;
        if self.pending >= CARRY_EVERY {
            self.propagate();
        }
    }

    /// Makes digits `from..=to` present; returns the position of `from` in `digits`.
    #[inline]
    fn reserve(&mut self, from: u32, to: u32) -> usize {
        if self.digits.is_empty() {
            self.lo = from;
        }
        if from < self.lo {
            let more = (self.lo - from) as usize;
            self.digits.splice(0..0, std::iter::repeat_n(0, more));
            self.lo = from;
        }
        let end = (to - self.lo + 1) as usize;
        if end > self.digits.len() {
            self.digits.resize(end, 0);
        }
        (from - self.lo) as usize
    }

    /// Moves carries up: every digit but the top one in `0..2^32`, the top one in
    /// `-2^32..2^32` (adding digits above where needed). The value is unchanged.
    fn propagate(&mut self) {
        self.pending = 0;
        let mut i = 0;
        while i < self.digits.len() {
            let carry = self.digits[i] >> DIGIT_BITS;
            let top = i + 1 == self.digits.len();
            if carry != 0 && !(top && carry == -1) {
                self.digits[i] -= carry << DIGIT_BITS;
                if top {
                    self.digits.push(0);
                }
                self.digits[i + 1] += carry;
            }
            i += 1;
        }
        while self.digits.last() == Some(&0) {
            self.digits.pop();
        }
    }

    /// The sum, rounded once to the nearest `f64` (ties to even; above `f64::MAX`, infinite).
    /// Where the sum is below 2^-1011 (subnormal territory) it may be rounded twice, still a
    /// function of the sum alone.
    pub fn value(&mut self) -> f64 {
        if let Some(v) = self.rounded {
            return v;
        }
        let v = if self.mixed {
            self.digits_value()
        } else {
            // `as` rounds to the nearest, ties to even: the exact sum rounded once.
            self.int as f64
        };
        self.rounded = Some(v);
        v
    }

    fn digits_value(&mut self) -> f64 {
        match self.infinite {
            [0, 0] => {}
            [_, 0] => return f64::INFINITY,
            [0, _] => return f64::NEG_INFINITY,
            _ => return f64::NAN,
        }
        self.propagate();
        let Some(&top) = self.digits.last() else {
            return 0.0;
        };
        if top < 0 {
            for d in &mut self.digits {
                *d = -*d;
            }
            let x = self.magnitude();
            for d in &mut self.digits {
                *d = -*d;
            }
            self.propagate();
            return -x;
        }
        self.magnitude()
    }

    /// The value of a sum that is not negative.
    fn magnitude(&mut self) -> f64 {
        self.propagate();
        let n = self.digits.len();
        if n == 0 {
            return 0.0;
        }
        let t = n - 1;
        let d = |k: usize| t.checked_sub(k).map_or(0, |i| self.digits[i] as u128);
        let mut top = (d(0) << (2 * DIGIT_BITS)) | (d(1) << DIGIT_BITS) | d(2);
        // The top digit is non-zero, so `top` has at least 65 significant bits: a set lowest
        // bit for anything non-zero below it rounds as the exact sum would.
        if n > 3 && self.digits[..n - 3].iter().any(|&x| x != 0) {
            top |= 1;
        }
        let exponent = DIGIT_BITS as i32 * (self.lo as i32 + t as i32 - 2) + LOWEST_EXPONENT;
        scale(top as f64, exponent)
    }
}

/// `x * 2^k`, exactly where the result is normal.
fn scale(mut x: f64, mut k: i32) -> f64 {
    let pow2 = |k: i32| f64::from_bits(((k + 1023) as u64) << 52);
    while k > 1023 {
        x *= pow2(1023);
        k -= 1023;
    }
    while k < -1022 {
        x *= pow2(-1022);
        k += 1022;
    }
    x * pow2(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shewchuk's exactly rounded sum (as Python's `math.fsum`): the oracle.
    fn fsum(xs: &[f64]) -> f64 {
        let mut partials: Vec<f64> = Vec::new();
        for &x in xs {
            let mut x = x;
            let mut i = 0;
            for j in 0..partials.len() {
                let mut y = partials[j];
                if x.abs() < y.abs() {
                    std::mem::swap(&mut x, &mut y);
                }
                let hi = x + y;
                let lo = y - (hi - x);
                if lo != 0.0 {
                    partials[i] = lo;
                    i += 1;
                }
                x = hi;
            }
            partials.truncate(i);
            partials.push(x);
        }
        // Round the partials (non-overlapping, increasing) as one number.
        let Some(mut hi) = partials.pop() else {
            return 0.0;
        };
        let mut lo = 0.0;
        while let Some(y) = partials.pop() {
            let x = hi;
            hi = x + y;
            let yr = hi - x;
            lo = y - yr;
            if lo != 0.0 {
                break;
            }
        }
        if let Some(&next) = partials.last()
            && ((lo < 0.0 && next < 0.0) || (lo > 0.0 && next > 0.0))
        {
            let y = lo * 2.0;
            let x = hi + y;
            if y == x - hi {
                hi = x;
            }
        }
        hi
    }

    /// A small deterministic generator for test values.
    fn xorshift(mut rng: u64) -> impl FnMut() -> u64 {
        move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        }
    }

    fn of(xs: &[f64]) -> f64 {
        let mut s = ExactSum::default();
        xs.iter().for_each(|&x| s.add(x));
        s.value()
    }

    #[test]
    fn sums_are_exact_then_rounded_once() {
        assert_eq!(of(&[]), 0.0);
        assert_eq!(of(&[1e100, 1.0, -1e100]), 1.0);
        assert_eq!(of(&[0.1; 10]), 1.0);
        assert_eq!(of(&[f64::MAX, f64::MAX, -f64::MAX]), f64::MAX);
        assert_eq!(of(&[f64::MAX, f64::MAX]), f64::INFINITY);
        assert_eq!(of(&[-f64::MAX, -f64::MAX]), f64::NEG_INFINITY);
        assert_eq!(of(&[5e-324, 5e-324]), 1e-323);
        assert_eq!(of(&[-3.5, 1.25]), -2.25);
        assert_eq!(of(&[1.0, 2f64.powi(-60), -1.0]), 2f64.powi(-60));
        // Ties round to even: 2^53 + 1 is half-way between two floats.
        assert_eq!(of(&[2f64.powi(53), 1.0]), 2f64.powi(53));
        assert_eq!(
            of(&[2f64.powi(53), 1.0, 2f64.powi(-40)]),
            2f64.powi(53) + 2.0
        );
    }

    #[test]
    fn adding_and_subtracting_equals_a_fresh_sum_of_what_is_left() {
        // A sliding window over values of wildly different magnitudes and signs.
        let mut next = xorshift(0x2545_f491_4f6c_dd1du64);
        let mut values = Vec::new();
        for _ in 0..20_000 {
            let r = next();
            let mantissa = (r >> 11) as f64 / (1u64 << 53) as f64;
            let exponent = (next() % 80) as i32 - 40;
            let sign = if r & 1 == 0 { 1.0 } else { -1.0 };
            values.push(sign * mantissa * 2f64.powi(exponent));
        }
        let mut window = ExactSum::default();
        let width = 97;
        for (i, &x) in values.iter().enumerate() {
            window.add(x);
            if i >= width {
                window.sub(values[i - width]);
            }
            let live = &values[i.saturating_sub(width - 1)..=i];
            let got = window.value();
            assert_eq!(got.to_bits(), fsum(live).to_bits(), "at {i}");
            assert_eq!(got.to_bits(), of(live).to_bits(), "at {i}");
        }
    }

    /// Integers (kept as an `i128`), and now and then another value (which moves the sum to
    /// the digits), added and taken away: the same bits as a fresh sum of what is left.
    #[test]
    fn integer_sums_and_their_move_to_the_digits_are_exact() {
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15u64);
        let mut values = Vec::new();
        for _ in 0..20_000 {
            let r = next();
            values.push(match r % 1_500 {
                0 => (r >> 20) as f64 * 0.37,
                1..=30 => -(((r >> 3) as i64) as f64),
                31..=60 => 0.0,
                61..=90 => -0.0,
                _ => ((r >> 40) as i64 - (1 << 23)) as f64,
            });
        }
        let width = 61;
        let mut window = ExactSum::default();
        for (i, &x) in values.iter().enumerate() {
            window.add(x);
            if i >= width {
                window.sub(values[i - width]);
            }
            let live = &values[i.saturating_sub(width - 1)..=i];
            assert_eq!(window.value().to_bits(), fsum(live).to_bits(), "at {i}");
            if i % 1_000 == 999 {
                // A fresh start: integers again.
                window.clear();
                for &x in live {
                    window.add(x);
                }
                assert_eq!(window.value().to_bits(), fsum(live).to_bits(), "at {i}");
            }
        }
    }

    #[test]
    fn carries_wait_without_overflow() {
        let mut s = ExactSum::default();
        // Near the top of a digit, many times over: propagation must keep cells in range.
        // Not an integer, so the digits are used.
        let x = 4_294_967_295.5;
        for _ in 0..100_000 {
            s.add(x);
        }
        s.pending = CARRY_EVERY - 1;
        s.add(x);
        assert_eq!(s.value(), x * 100_001.0);
        for _ in 0..100_001 {
            s.sub(x);
        }
        assert_eq!(s.value(), 0.0);
        s.sub(0.5);
        assert_eq!(s.value(), -0.5);
        s.add(f64::INFINITY);
        assert_eq!(s.value(), f64::INFINITY);
        s.sub(f64::INFINITY);
        assert_eq!(s.value(), -0.5);
    }
}
