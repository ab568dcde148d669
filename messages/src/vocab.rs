//! Words every crate shares, as types checked in one place.
//!
//! - [`Exit`]: where an answer came from, a side branch (numbered from 1)
//!   or the final exit, which is named, never a number.
//! - [`PTar`]: a confidence threshold. Its ranges are stated here once: a
//!   plan's p_tar lies in [0, 1] (0 keeps every input on the device, 1
//!   offloads every input: the planner's extremes); a target a person sets
//!   (a flag, a scenario, a fleet's start) lies strictly inside, (0, 1).
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::MessageError;

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Exit {
    /// Side branch k, numbered from 1.
    Branch(usize),
    /// The final exit, at the end of the network.
    Final,
}

impl Exit {
    /// Its slot in an exit list ordered branch 1, branch 2, ..., final, of
    /// a model with `branches` side branches.
    pub fn index(self, branches: usize) -> usize {
        match self {
            Exit::Branch(k) => k.saturating_sub(1).min(branches),
            Exit::Final => branches,
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Branch(k) => write!(f, "branch{k}"),
            Exit::Final => f.write_str("final"),
        }
    }
}

/// A branch as its number, the final exit as `"final"`.
impl Serialize for Exit {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Exit::Branch(k) => s.serialize_u64(*k as u64),
            Exit::Final => s.serialize_str("final"),
        }
    }
}

/// Also reads files written before the final exit had a name, which wrote
/// it as 0.
impl<'de> Deserialize<'de> for Exit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Name(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(0) => Ok(Exit::Final),
            Raw::Number(k) => usize::try_from(k).map(Exit::Branch).map_err(serde::de::Error::custom),
            Raw::Name(n) if n == "final" => Ok(Exit::Final),
            Raw::Name(n) => Err(serde::de::Error::custom(format!("exit {n:?}: give a branch number or \"final\""))),
        }
    }
}

/// A confidence threshold: an input stays on the device when its calibrated
/// branch confidence reaches it.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize)]
#[serde(transparent)]
pub struct PTar(f64);

impl PTar {
    /// A plan's threshold, in [0, 1].
    pub fn plan(value: f64) -> Result<Self, MessageError> {
        if (0.0..=1.0).contains(&value) {
            Ok(Self(value))
        } else {
            Err(MessageError::PTar(value))
        }
    }

    /// A target a person sets, in (0, 1): 0 and 1 are not targets but the
    /// planner's extremes (everything on the device, everything offloaded).
    pub fn target(value: f64) -> Result<Self, MessageError> {
        if value > 0.0 && value < 1.0 {
            Ok(Self(value))
        } else {
            Err(MessageError::PTarTarget(value))
        }
    }

    pub fn get(self) -> f64 {
        self.0
    }
}

impl<'de> Deserialize<'de> for PTar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        PTar::plan(f64::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_final_exit_has_a_name_and_old_files_still_read() {
        assert_eq!(serde_json::to_string(&[Exit::Branch(2), Exit::Final]).unwrap(), r#"[2,"final"]"#);
        let read: Vec<Exit> = serde_json::from_str(r#"[1, "final", 0]"#).unwrap();
        assert_eq!(read, vec![Exit::Branch(1), Exit::Final, Exit::Final]);
        assert!(serde_json::from_str::<Exit>(r#""last""#).is_err());
        assert_eq!((Exit::Branch(2).index(3), Exit::Final.index(3), Exit::Branch(9).index(3)), (1, 3, 3));
        assert_eq!(format!("{} {}", Exit::Branch(1), Exit::Final), "branch1 final");
    }

    #[test]
    fn p_tar_ranges_are_stated_once() {
        for v in [0.0, 0.5, 1.0] {
            assert_eq!(PTar::plan(v).unwrap().get(), v);
        }
        for v in [-0.1, 1.1, f64::NAN] {
            assert!(PTar::plan(v).is_err(), "{v}");
        }
        assert!(PTar::target(0.9).is_ok());
        for v in [0.0, 1.0, f64::NAN, f64::INFINITY] {
            let e = PTar::target(v).unwrap_err().to_string();
            assert!(e.contains("(0, 1)"), "{v}: {e}");
        }
        assert!(serde_json::from_str::<PTar>("1.5").is_err());
    }
}
