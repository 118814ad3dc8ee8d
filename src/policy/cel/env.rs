//! Builds the `cel::Env`: the standard library, the crate's four extensions (strings, lists,
//! math, encoders), optional types, our macros and the Cerbos / cel-go extension functions.

use cel::{DeclarationError, Env};

type Extension = fn(&mut Env) -> Result<(), DeclarationError>;

/// The environment every expression is compiled and evaluated with.
pub(super) fn build() -> Result<Env, String> {
    let mut env = Env::stdlib();
    let extensions: [Extension; 4] = [
        cel::extensions::strings,
        cel::extensions::lists,
        cel::extensions::math,
        cel::extensions::encoders,
    ];
    for ext in extensions {
        env.add_extension(ext).map_err(|e| e.to_string())?;
    }
    // cel-go keeps the last entry of a map literal that repeats a key.
    env.set_error_on_duplicate_map_keys(false);
    super::macros::register(&mut env).map_err(|e| e.to_string())?;
    super::funcs::register(&mut env).map_err(|e| e.to_string())?;
    Ok(env)
}
