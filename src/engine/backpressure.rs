//! Watermarks with hysteresis: engaged above `high`, released below `low`.

#[derive(Debug, Clone)]
pub struct Watermarks {
    high: u64,
    low: u64,
    engaged: bool,
}

impl Watermarks {
    pub fn new(high: u64, low: u64) -> Self {
        Self {
            high,
            low: low.min(high),
            engaged: false,
        }
    }

    /// Feeds the current depth; returns whether backpressure is engaged.
    pub fn update(&mut self, depth: u64) -> bool {
        if self.engaged {
            if depth < self.low {
                self.engaged = false;
            }
        } else if depth > self.high {
            self.engaged = true;
        }
        self.engaged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hysteresis() {
        let mut w = Watermarks::new(100, 50);
        assert!(!w.update(100));
        assert!(w.update(101));
        assert!(w.update(60));
        assert!(w.update(50));
        assert!(!w.update(49));
        assert!(!w.update(99));
    }
}
