//! `pagerpc/options.proto`: serving it to protox, and reading the
//! `(pagerpc.payload)` option of every rpc.

use std::collections::HashMap;
use std::path::Path;

use protox::file::{
    ChainFileResolver, File, FileResolver, GoogleFileResolver, IncludeFileResolver,
};
use protox::prost_reflect::{DescriptorPool, Value};

use crate::Error;

/// The text of `pagerpc/options.proto`, which `.proto` files compiled by
/// this crate may import for the `(pagerpc.payload)` rpc option.
pub const OPTIONS_PROTO: &str = include_str!("../proto/pagerpc/options.proto");

/// The name `.proto` files import it by.
pub(crate) const OPTIONS_PROTO_NAME: &str = "pagerpc/options.proto";

/// The extension's full name.
const PAYLOAD_OPTION: &str = "pagerpc.payload";

/// Which directions of an rpc carry payloads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Payloads {
    /// The client's messages.
    pub request: bool,
    /// The server's messages.
    pub response: bool,
}

/// Serves `pagerpc/options.proto` from this crate.
struct Provided;

impl FileResolver for Provided {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        if name == OPTIONS_PROTO_NAME {
            File::from_source(name, OPTIONS_PROTO)
        } else {
            Err(protox::Error::file_not_found(name))
        }
    }
}

/// The user's include directories, then this crate's file, then Google's
/// well-known files.
pub(crate) fn resolver(includes: &[impl AsRef<Path>]) -> ChainFileResolver {
    let mut r = ChainFileResolver::new();
    for i in includes {
        r.add(IncludeFileResolver::new(i.as_ref().to_owned()));
    }
    r.add(Provided);
    r.add(GoogleFileResolver::new());
    r
}

/// Whether a file is ours or Google's: compiled for its definitions, never
/// generated into the user's crate (prost maps Google's types to
/// `prost_types`).
pub(crate) fn is_provided(name: &str) -> bool {
    name == OPTIONS_PROTO_NAME || name.starts_with("google/protobuf/")
}

/// The payload directions of every rpc of every service, keyed by
/// `package.Service/Method`.
pub(crate) fn payload_directions(
    pool: &DescriptorPool,
) -> Result<HashMap<String, Payloads>, Error> {
    let ext = pool.get_extension_by_name(PAYLOAD_OPTION).ok_or_else(|| {
        Error::Service(format!(
            "`{PAYLOAD_OPTION}` is missing from the descriptor pool"
        ))
    })?;
    let mut out = HashMap::new();
    for service in pool.services() {
        for method in service.methods() {
            let name = format!("{}/{}", service.full_name(), method.name());
            let options = method.options();
            let value = if options.has_extension(&ext) {
                match options.get_extension(&ext).as_ref() {
                    Value::EnumNumber(n) => *n,
                    other => {
                        return Err(Error::Service(format!(
                            "{name}: `({PAYLOAD_OPTION})` is not an enum value: {other:?}"
                        )))
                    }
                }
            } else {
                0
            };
            let p = match value {
                0 => Payloads::default(),
                1 => Payloads {
                    request: true,
                    response: false,
                },
                2 => Payloads {
                    request: false,
                    response: true,
                },
                3 => Payloads {
                    request: true,
                    response: true,
                },
                n => {
                    return Err(Error::Service(format!(
                        "{name}: `({PAYLOAD_OPTION})` has unknown value {n}"
                    )))
                }
            };
            out.insert(name, p);
        }
    }
    Ok(out)
}
