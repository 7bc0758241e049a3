//! A feature key as the state holds it: its UTF-8 bytes inline up to [`INLINE`] of them (a
//! UUID's 36 characters fit), boxed beyond. A lookup compares the key in the map's own bucket
//! instead of behind a pointer to a string of its own, a cache miss fewer per event; and a key
//! held inline costs no allocation. Hashed and compared as its bytes, so a map of keys is looked
//! up by `&[u8]`.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};

/// Bytes held inline.
const INLINE: usize = 38;

/// A feature key's UTF-8 bytes.
#[derive(Clone)]
pub(super) enum Key {
    /// The first `len` bytes.
    Inline { len: u8, bytes: [u8; INLINE] },
    /// A longer key.
    Boxed(Box<[u8]>),
}

impl Key {
    pub(super) fn new(key: &[u8]) -> Self {
        match u8::try_from(key.len()) {
            Ok(len) if key.len() <= INLINE => {
                let mut bytes = [0; INLINE];
                bytes[..key.len()].copy_from_slice(key);
                Key::Inline { len, bytes }
            }
            _ => Key::Boxed(key.into()),
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

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Key {}

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
        assert_eq!(map.get(uuid.as_bytes()), Some(&2));
        assert_eq!(map.get(long.as_bytes()), Some(&4));
        assert_eq!(map.get("".as_bytes()), Some(&0));
        assert_eq!(map.get(&long.as_bytes()[..INLINE]), None);
        assert_eq!(Key::new(uuid.as_bytes()).as_bytes(), uuid.as_bytes());
    }
}
