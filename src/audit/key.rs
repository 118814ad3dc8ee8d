//! The per-install chain key (`audit.key_file`): 32 random bytes, created on first start next to
//! the database (mode 0600), never inside it. Every chained row's hash is
//! `HMAC-SHA-256(key, prev ‖ seq ‖ SHA-256(canonical logical row))` (RFC 2104), so someone who
//! can write the database file but not read the key cannot recompute the chain after an edit.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use super::links::unhex32;

/// The chain key. `Debug` never prints it.
#[derive(Clone)]
pub struct ChainKey {
    /// SHA-256 state after absorbing `key ⊕ ipad` / `key ⊕ opad` (HMAC's two keyed prefixes).
    inner: Sha256,
    outer: Sha256,
    id: String,
}

impl std::fmt::Debug for ChainKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainKey").field("id", &self.id).finish()
    }
}

/// Bytes in a key.
pub const KEY_BYTES: usize = 32;

impl ChainKey {
    pub fn from_bytes(key: &[u8; KEY_BYTES]) -> ChainKey {
        let mut ipad = [0x36u8; 64];
        let mut opad = [0x5cu8; 64];
        for (i, b) in key.iter().enumerate() {
            ipad[i] ^= b;
            opad[i] ^= b;
        }
        let mut inner = Sha256::new();
        inner.update(ipad);
        let mut outer = Sha256::new();
        outer.update(opad);
        // A public name for the key (which key a chain needs), not a way to recover it.
        let mut h = Sha256::new();
        h.update(b"toolgate audit key id\n");
        h.update(key);
        let id = super::links::hex(&h.finalize()[..8]);
        ChainKey { inner, outer, id }
    }

    /// HMAC-SHA-256 of `parts` (concatenated).
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut i = self.inner.clone();
        for p in parts {
            i.update(p);
        }
        let mut o = self.outer.clone();
        o.update(i.finalize());
        o.finalize().into()
    }

    /// A short public identifier of this key (16 hex digits), stored with the chain.
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// Where the key lives by default: `audit.key` next to the database.
pub fn default_path(db: &Path) -> PathBuf {
    match db.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.join("audit.key"),
        _ => PathBuf::from("audit.key"),
    }
}

/// Reads a key file: 64 hex digits (surrounding white space allowed).
pub fn load(path: &Path) -> Result<ChainKey, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!("audit chain key {}: no such file", path.display())
        } else {
            format!("audit chain key {}: {e}", path.display())
        }
    })?;
    let t = text.trim();
    let bytes = unhex32(t).ok_or_else(|| {
        format!(
            "audit chain key {}: want 64 hex digits, found {} characters",
            path.display(),
            t.len()
        )
    })?;
    Ok(ChainKey::from_bytes(&bytes))
}

/// Reads the key, creating it (32 bytes from the kernel's random source, mode 0600) when the
/// file does not exist.
pub fn load_or_create(path: &Path) -> Result<ChainKey, String> {
    if path.exists() {
        check_mode(path)?;
        return load(path);
    }
    let mut key = [0u8; KEY_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .map_err(|e| format!("audit chain key: reading /dev/urandom: {e}"))?;
    super::prepare_dir(path).map_err(|e| format!("audit chain key: {e}"))?;
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("audit chain key {}: creating: {e}", path.display()))?;
    f.write_all(format!("{}\n", super::links::hex(&key)).as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("audit chain key {}: writing: {e}", path.display()))?;
    Ok(ChainKey::from_bytes(&key))
}

/// A key others can read is not a secret: refuse it.
fn check_mode(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let m =
        std::fs::metadata(path).map_err(|e| format!("audit chain key {}: {e}", path.display()))?;
    let mode = m.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "audit chain key {}: mode {mode:o} lets other users read it; chmod 600 it",
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_for_a_32_byte_key() {
        // RFC 4231 test case 2 uses a short key; HMAC pads any key up to the block, so a 32-byte
        // key "Jefe" + 28 zero bytes gives the same MAC.
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(b"Jefe");
        let k = ChainKey::from_bytes(&key);
        let mac = k.mac(&[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            super::super::links::hex(&mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(!format!("{k:?}").contains("Jefe"));
    }

    #[test]
    fn keys_are_created_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/audit.key");
        let a = load_or_create(&p).unwrap();
        let b = load_or_create(&p).unwrap();
        assert_eq!(a.id(), b.id());
        assert_eq!(a.mac(&[b"x"]), b.mac(&[b"x"]));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_or_create(&p).unwrap_err().contains("chmod 600"));
        std::fs::write(&p, "nothex").unwrap();
        assert!(load(&p).unwrap_err().contains("64 hex digits"));
        assert!(
            load(&dir.path().join("none"))
                .unwrap_err()
                .contains("no such file")
        );
    }
}
