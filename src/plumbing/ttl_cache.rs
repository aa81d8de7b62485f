//! A bounded map whose entries expire: the one cache type of the service (verified OpenID
//! tokens, resolved federation destinations, discovered client-server APIs, recently issued
//! SFU identities).
//!
//! Time is an input (`now`), so tests need no sleeping. When full, expired entries go first,
//! then the tenth of the entries closest to expiry: an insert never fails and the map never
//! holds more than its capacity.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
struct Entry<V> {
    value: V,
    expires: Instant,
}

/// A map of at most `capacity` entries, each valid until its own expiry.
#[derive(Debug, Clone)]
pub struct TtlCache<K, V> {
    map: HashMap<K, Entry<V>>,
    capacity: usize,
}

impl<K: Eq + Hash + Clone, V: Clone> TtlCache<K, V> {
    /// An empty cache holding at most `capacity` entries (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            map: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// The most entries it holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The live value of `key` at `now`.
    pub fn get<Q>(&self, key: &Q, now: Instant) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map
            .get(key)
            .filter(|e| e.expires > now)
            .map(|e| e.value.clone())
    }

    /// Stores `value` under `key` until `now + ttl`, making room if the cache is full.
    pub fn insert(&mut self, key: K, value: V, ttl: Duration, now: Instant) {
        self.insert_until(key, value, now + ttl, now);
    }

    /// Stores `value` under `key` until `expires`.
    pub fn insert_until(&mut self, key: K, value: V, expires: Instant, now: Instant) {
        if expires <= now {
            self.map.remove(&key);
            return;
        }
        if !self.map.contains_key(&key) && self.map.len() >= self.capacity {
            self.make_room(now);
        }
        self.map.insert(key, Entry { value, expires });
    }

    /// Removes `key`, returning its value (live or not).
    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.remove(key).map(|e| e.value)
    }

    /// Keeps only the live entries for which `keep` is true.
    pub fn retain(&mut self, now: Instant, mut keep: impl FnMut(&K, &V) -> bool) {
        self.map.retain(|k, e| e.expires > now && keep(k, &e.value));
    }

    /// Live values at `now`.
    pub fn values(&self, now: Instant) -> impl Iterator<Item = &V> {
        self.map
            .values()
            .filter(move |e| e.expires > now)
            .map(|e| &e.value)
    }

    /// Entries held, expired or not (expired ones leave on the next insert into a full cache
    /// or [`TtlCache::purge`]).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Drops every expired entry.
    pub fn purge(&mut self, now: Instant) {
        self.map.retain(|_, e| e.expires > now);
    }

    fn make_room(&mut self, now: Instant) {
        self.purge(now);
        if self.map.len() < self.capacity {
            return;
        }
        let mut by_expiry: Vec<(Instant, K)> = self
            .map
            .iter()
            .map(|(k, e)| (e.expires, k.clone()))
            .collect();
        by_expiry.sort_by_key(|(t, _)| *t);
        for (_, k) in by_expiry.into_iter().take(self.capacity / 10 + 1) {
            self.map.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_at_their_own_time() {
        let t0 = Instant::now();
        let mut c = TtlCache::new(10);
        c.insert("a", 1, Duration::from_secs(1), t0);
        c.insert("b", 2, Duration::from_secs(5), t0);
        assert_eq!(c.get("a", t0), Some(1));
        assert_eq!(c.get("a", t0 + Duration::from_secs(1)), None);
        assert_eq!(c.get("b", t0 + Duration::from_secs(4)), Some(2));
        c.purge(t0 + Duration::from_secs(2));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn never_holds_more_than_its_capacity_and_drops_the_soonest_expiring() {
        let t0 = Instant::now();
        let mut c = TtlCache::new(100);
        for i in 0..10_000u64 {
            c.insert(i, i, Duration::from_secs(1000 + i), t0);
            assert!(c.len() <= 100);
        }
        assert_eq!(c.get(&9_999, t0), Some(9_999), "the newest stays");
        assert_eq!(c.get(&0, t0), None, "the soonest expiring went first");
    }

    #[test]
    fn an_already_expired_insert_removes_the_key() {
        let t0 = Instant::now();
        let mut c = TtlCache::new(4);
        c.insert("a", 1, Duration::from_secs(5), t0);
        c.insert_until("a", 2, t0, t0);
        assert!(c.is_empty());
    }
}
