//! The wall clock as the actors stamp messages: microseconds since the Unix
//! epoch (0 if the clock is before it).

pub fn unix_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}
