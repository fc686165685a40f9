//! A clip's copies: who is still owed it, in what order.

use super::*;

/// The recipients still owed a clip, each with its copy's order number: a
/// short list for the usual one or few, a map for a channel clip's
/// thousands (an ack must not scan them all).
#[derive(Default)]
pub(super) struct Copies {
    list: Vec<(Arc<str>, u64)>,
    map: HashMap<Arc<str>, u64>,
}

/// Above this many copies a clip's recipients go in the map.
const COPIES_LIST_MAX: usize = 16;

impl Copies {
    pub(super) fn from_vec(v: Vec<(Arc<str>, u64)>) -> Self {
        if v.len() > COPIES_LIST_MAX {
            Copies {
                list: Vec::new(),
                map: v.into_iter().collect(),
            }
        } else {
            Copies {
                list: v,
                map: HashMap::default(),
            }
        }
    }

    pub(super) fn get(&self, r: &str) -> Option<u64> {
        self.map
            .get(r)
            .copied()
            .or_else(|| self.list.iter().find(|(x, _)| &**x == r).map(|(_, o)| *o))
    }

    /// Adds a copy; false if `r` already has one.
    pub(super) fn insert(&mut self, r: Arc<str>, order: u64) -> bool {
        if self.get(&r).is_some() {
            return false;
        }
        if self.map.is_empty() && self.list.len() < COPIES_LIST_MAX {
            self.list.push((r, order));
        } else {
            self.map.extend(self.list.drain(..));
            self.map.insert(r, order);
        }
        true
    }

    /// Removes `r`'s copy; false if it had none.
    pub(super) fn remove(&mut self, r: &str) -> bool {
        if self.map.remove(r).is_some() {
            return true;
        }
        match self.list.iter().position(|(x, _)| &**x == r) {
            Some(i) => {
                self.list.swap_remove(i);
                true
            }
            None => false,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.list.is_empty() && self.map.is_empty()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&Arc<str>, u64)> {
        self.list
            .iter()
            .map(|(r, o)| (r, *o))
            .chain(self.map.iter().map(|(r, o)| (r, *o)))
    }

    pub(super) fn to_vec(&self) -> Vec<(Arc<str>, u64)> {
        self.iter().map(|(r, o)| (r.clone(), o)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_move_from_list_to_map_and_back_out() {
        let name = |i: usize| -> Arc<str> { Arc::from(format!("u{i}")) };
        let mut c = Copies::from_vec((0..3).map(|i| (name(i), i as u64)).collect());
        assert!(!c.insert(name(1), 99), "one copy per recipient");
        for i in 3..100 {
            assert!(c.insert(name(i), i as u64));
        }
        assert!(c.list.is_empty() && c.map.len() == 100);
        assert_eq!(c.get("u42"), Some(42));
        for i in 0..100 {
            assert!(c.remove(&name(i)));
            assert!(!c.remove(&name(i)));
        }
        assert!(c.is_empty());
        let big = Copies::from_vec((0..40).map(|i| (name(i), i as u64)).collect());
        assert_eq!(big.to_vec().len(), 40);
        assert_eq!(big.get("u39"), Some(39));
    }
}
