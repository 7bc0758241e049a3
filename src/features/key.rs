//! A feature key as the state holds it: its UTF-8 bytes inline up to [`INLINE`] of them (a
//! UUID's 36 characters fit), boxed beyond. A lookup compares the key in the map's own bucket
//! instead of behind a pointer to a string of its own, a cache miss fewer per event; and a key
//! held inline costs no allocation. Hashed as its bytes, so a map of keys can also be looked up
//! by `&[u8]`; looked up by a `Key`, two inline keys compare as two fixed-size arrays (the bytes
//! past a key's length are zero), with no call to compare slices.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};

/// Bytes held inline.
const INLINE: usize = 38;

/// A feature key's UTF-8 bytes. Which variant holds a key depends only on its length, and the
/// bytes of an inline key past its length are zero, so two keys are equal exactly when their
/// bytes are (as `Borrow<[u8]>` requires).
#[derive(Clone, PartialEq, Eq)]
pub(super) enum Key {
    /// The first `len` bytes.
    Inline { len: u8, bytes: [u8; INLINE] },
    /// A longer key.
    Boxed(Box<[u8]>),
}

impl Key {
    pub(super) fn new(key: &[u8]) -> Self {
        Key::inline(key).unwrap_or_else(|| Key::Boxed(key.into()))
    }

    /// The key, where it is held inline.
    #[inline]
    pub(super) fn inline(key: &[u8]) -> Option<Self> {
        match u8::try_from(key.len()) {
            Ok(len) if key.len() <= INLINE => {
                let mut bytes = [0; INLINE];
                bytes[..key.len()].copy_from_slice(key);
                Some(Key::Inline { len, bytes })
            }
            _ => None,
        }
    }

    pub(super) fn as_bytes(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Key::Boxed(b) => b,
        }
    }
}

impl Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

/// As `[u8]` hashes, so a map of keys finds a key by its bytes.
impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn keys_inline_and_boxed_are_found_by_their_bytes() {
        let uuid = "9f1c2a7e-3b4d-4e5f-8a6b-7c8d9e0f1a2b";
        let long = "k".repeat(INLINE + 1);
        let mut map: HashMap<Key, u32, foldhash::fast::RandomState> = HashMap::default();
        for (i, k) in ["", "a", uuid, &"x".repeat(INLINE), &long]
            .iter()
            .enumerate()
        {
            map.insert(Key::new(k.as_bytes()), i as u32);
        }
        assert!(matches!(Key::new(uuid.as_bytes()), Key::Inline { .. }));
        assert!(matches!(Key::new(long.as_bytes()), Key::Boxed(_)));
        assert!(Key::inline(long.as_bytes()).is_none());
        assert_eq!(map.get(uuid.as_bytes()), Some(&2));
        assert_eq!(map.get(long.as_bytes()), Some(&4));
        assert_eq!(map.get("".as_bytes()), Some(&0));
        assert_eq!(map.get(&long.as_bytes()[..INLINE]), None);
        assert_eq!(Key::new(uuid.as_bytes()).as_bytes(), uuid.as_bytes());
        // By a key: the same entries, and keys equal exactly when their bytes are.
        for (i, k) in ["", "a", uuid, &"x".repeat(INLINE), &long]
            .iter()
            .enumerate()
        {
            assert_eq!(map.get(&Key::new(k.as_bytes())), Some(&(i as u32)));
        }
        assert_eq!(map.get(&Key::new(&uuid.as_bytes()[..35])), None);
        assert_ne!(Key::new(b"ab"), Key::new(b"a"));
        assert_ne!(Key::new(b"a\0"), Key::new(b"a"));
    }
}
