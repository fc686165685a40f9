//! The relay's hash maps: foldhash (hashbrown's own default), seeded at
//! random per map, in place of std's SipHash-1-3. Their keys are clip ids,
//! user and channel names: short, and hashed several times per clip on the
//! hot path, where SipHash took 1.5% of the relay's CPU (docs/benchmarks.md,
//! "The relay's own CPU per clip, part 2"). The seed
//! keeps colliding keys hard to make without knowing it.

/// The hasher of every map below.
pub type State = foldhash::fast::RandomState;
/// `std::collections::HashMap` with [`State`].
pub type HashMap<K, V> = std::collections::HashMap<K, V, State>;
/// `std::collections::HashSet` with [`State`].
pub type HashSet<K> = std::collections::HashSet<K, State>;
/// `dashmap::DashMap` with [`State`].
pub type DashMap<K, V> = dashmap::DashMap<K, V, State>;
