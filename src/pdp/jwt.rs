//! `auxData.jwt` / `auxData.jwts`: tokens verified against the configured key sets
//! (`pdp.jwt_keysets`, Cerbos's `auxData.jwt.keySets`), their claims handed to CEL as
//! `request.auxData.jwt` (or `request.auxData.jwts.<name>.claims`).
//!
//! As Cerbos (https://docs.cerbos.dev/cerbos/latest/configuration/auxdata): the signature must
//! verify with a key of the named key set (without `keySetId`: the only configured set),
//! `exp` and `nbf` are enforced when present, `aud`/`iss` are left to policy. A token that
//! fails any of this is a 400 `invalid auxData`; it never reaches policy. Key sets are JWK sets
//! (or one JWK) read once at start, from a file or inline base64 data; no network fetches.

use std::path::{Path, PathBuf};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::request::{AuxData, Jwt};
use super::status::Status;

/// One `pdp.jwt_keysets` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtKeySetConfig {
    pub id: String,
    #[serde(default)]
    pub local: Option<LocalKeySet>,
    /// Cerbos's remote (fetched) key sets: refused, toolgate fetches nothing at run time.
    #[serde(default)]
    pub remote: Option<Value>,
}

/// A key set on disk (`file`, a JWK set or one JWK) or inline (`data`, base64 of the same).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalKeySet {
    #[serde(default)]
    pub file: Option<PathBuf>,
    #[serde(default)]
    pub data: Option<String>,
}

/// One configured key set.
pub struct KeySet {
    pub id: String,
    keys: Vec<(Option<String>, DecodingKey)>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("id", &self.id)
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// Every configured key set.
#[derive(Debug, Default)]
pub struct KeySets {
    pub sets: Vec<KeySet>,
}

impl KeySet {
    /// A key set from JWK-set JSON (`{"keys":[...]}`) or a single JWK.
    pub fn from_json(id: &str, bytes: &[u8]) -> Result<KeySet, String> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        let jwks: Vec<Jwk> = if v.get("keys").is_some() {
            serde_json::from_value::<JwkSet>(v)
                .map_err(|e| format!("not a JWK set: {e}"))?
                .keys
        } else {
            vec![serde_json::from_value::<Jwk>(v).map_err(|e| format!("not a JWK: {e}"))?]
        };
        let mut keys = Vec::new();
        for (i, k) in jwks.iter().enumerate() {
            let key = DecodingKey::from_jwk(k).map_err(|e| format!("keys[{i}]: {e}"))?;
            keys.push((k.common.key_id.clone(), key));
        }
        if keys.is_empty() {
            return Err("the key set has no keys".into());
        }
        Ok(KeySet {
            id: id.to_string(),
            keys,
        })
    }

    pub fn from_file(id: &str, path: &Path) -> Result<KeySet, String> {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        KeySet::from_json(id, &bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Verifies `token` with this set's keys; the claims on success.
    fn verify(&self, token: &str, now: u64) -> Result<Map<String, Value>, String> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| format!("malformed token: {e}"))?;
        let mut validation = Validation::new(header.alg);
        validation.required_spec_claims.clear();
        validation.leeway = 0;
        validation.validate_aud = false;
        validation.validate_nbf = true;
        // jsonwebtoken reads the clock itself for exp/nbf; checked again below with `now`
        // so tests can pin time.
        validation.validate_exp = false;
        let candidates = self
            .keys
            .iter()
            .filter(|(kid, _)| match (&header.kid, kid) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            });
        let mut last = "no key of the key set matches the token's kid".to_string();
        for (_, key) in candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(token, key, &validation) {
                Ok(data) => {
                    let claims = data.claims;
                    if let Some(exp) = claims.get("exp").and_then(Value::as_f64) {
                        if (now as f64) >= exp {
                            return Err("the token has expired".into());
                        }
                    }
                    if let Some(nbf) = claims.get("nbf").and_then(Value::as_f64) {
                        if (now as f64) < nbf {
                            return Err("the token is not valid yet (nbf)".into());
                        }
                    }
                    return Ok(claims);
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    }
}

impl KeySets {
    /// Reads every configured key set (paths already resolved by the config check).
    pub fn load(configured: &[JwtKeySetConfig]) -> Result<KeySets, String> {
        let mut sets = Vec::new();
        for (i, k) in configured.iter().enumerate() {
            let local = k.local.clone().unwrap_or_default();
            let set = match (&local.file, &local.data) {
                (Some(f), None) => KeySet::from_file(&k.id, f),
                (None, Some(d)) => {
                    use base64::Engine as _;
                    base64::engine::general_purpose::STANDARD
                        .decode(d.trim())
                        .map_err(|e| format!("local.data is not base64: {e}"))
                        .and_then(|b| KeySet::from_json(&k.id, &b))
                }
                _ => Err("needs local.file or local.data (exactly one)".to_string()),
            };
            sets.push(set.map_err(|e| format!("pdp.jwt_keysets[{i}] ({}): {e}", k.id))?);
        }
        Ok(KeySets { sets })
    }

    fn verify_one(&self, field: &str, jwt: &Jwt, now: u64) -> Result<Map<String, Value>, Status> {
        let fail = |why: String| Status::invalid(format!("invalid auxData: {field}: {why}"));
        if jwt.token.is_empty() {
            return Err(fail("token is empty".into()));
        }
        if self.sets.is_empty() {
            return Err(fail(
                "no JWT key sets are configured (pdp.jwt_keysets)".into(),
            ));
        }
        if !jwt.key_set_id.is_empty() {
            let set = self
                .sets
                .iter()
                .find(|s| s.id == jwt.key_set_id)
                .ok_or_else(|| fail(format!("unknown keySetId {:?}", jwt.key_set_id)))?;
            return set.verify(&jwt.token, now).map_err(fail);
        }
        // As Cerbos: without keySetId, the only configured set; with several, no guessing.
        match self.sets.as_slice() {
            [only] => only.verify(&jwt.token, now).map_err(fail),
            _ => Err(fail(
                "cannot determine the key set: keySetId is required when several are configured"
                    .into(),
            )),
        }
    }

    /// The auxiliary data CEL sees, from the request's tokens; `Value::Null` without tokens.
    /// `now` is seconds since the epoch.
    pub fn decode(&self, aux: Option<&AuxData>, now: u64) -> Result<Value, Status> {
        let Some(aux) = aux else {
            return Ok(Value::Null);
        };
        if let Some(jwt) = &aux.jwt {
            let claims = self.verify_one("auxData.jwt", jwt, now)?;
            let mut m = Map::new();
            m.insert("jwt".into(), Value::Object(claims));
            return Ok(Value::Object(m));
        }
        if let Some(named) = aux.jwts.as_ref().filter(|m| !m.is_empty()) {
            let mut out = Map::new();
            for (name, jwt) in named {
                let claims = self.verify_one(&format!("auxData.jwts.{name}"), jwt, now)?;
                let mut entry = Map::new();
                entry.insert("claims".into(), Value::Object(claims));
                out.insert(name.clone(), Value::Object(entry));
            }
            let mut m = Map::new();
            m.insert("jwts".into(), Value::Object(out));
            return Ok(Value::Object(m));
        }
        Ok(Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    fn hs_set() -> KeySet {
        // "secret" base64url: c2VjcmV0
        KeySet::from_json(
            "ks",
            br#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"k1","alg":"HS256"}]}"#,
        )
        .unwrap_or_else(|e| KeySet {
            id: e,
            keys: Vec::new(),
        })
    }

    fn token(secret: &[u8], claims: Value) -> String {
        let mut h = Header::new(jsonwebtoken::Algorithm::HS256);
        h.kid = Some("k1".into());
        jsonwebtoken::encode(&h, &claims, &EncodingKey::from_secret(secret)).unwrap_or_default()
    }

    #[test]
    fn verifies_signature_and_expiry() {
        let sets = KeySets {
            sets: vec![hs_set()],
        };
        let jwt = |t: String| AuxData {
            jwt: Some(Jwt {
                token: t,
                key_set_id: String::new(),
            }),
            jwts: None,
        };
        let good = token(b"secret", serde_json::json!({"sub": "a", "exp": 2000}));
        let v = sets.decode(Some(&jwt(good.clone())), 1000);
        assert_eq!(
            v.ok()
                .and_then(|v| v["jwt"]["sub"].as_str().map(String::from)),
            Some("a".into())
        );
        let e = sets
            .decode(Some(&jwt(good)), 3000)
            .err()
            .map(|s| s.message)
            .unwrap_or_default();
        assert!(e.contains("expired"), "{e}");
        let bad = token(b"other", serde_json::json!({"sub": "a"}));
        let e = sets
            .decode(Some(&jwt(bad)), 1000)
            .err()
            .map(|s| (s.code, s.message));
        assert!(
            matches!(e, Some((3, ref m)) if m.starts_with("invalid auxData")),
            "{e:?}"
        );
        let e = sets
            .decode(Some(&jwt("garbage".into())), 1000)
            .err()
            .map(|s| s.code);
        assert_eq!(e, Some(3));
    }
}
