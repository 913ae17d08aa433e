//! The Rust code generated for each `.proto` service: its method-name
//! constants, client, server trait and registration.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::rc::Rc;

use heck::{ToShoutySnakeCase, ToSnakeCase};
use prost_build::{Comments, Method, Service, ServiceGenerator};

use crate::options::Payloads;

/// Client methods every generated client has; an rpc may not take their
/// names.
const CLIENT_RESERVED: &[&str] = &["new", "connect", "connect_with", "inner", "into_inner"];

/// prost's service generator hook.
pub(crate) struct Generator {
    pub client: bool,
    pub server: bool,
    /// Also the async (tokio) client and server trait.
    pub async_api: bool,
    /// Payload directions by `package.Service/Method`.
    pub payloads: HashMap<String, Payloads>,
    /// Problems found; `compile` reports them after prost returns.
    pub errors: Rc<RefCell<Vec<String>>>,
}

/// One rpc, as the generated code needs it.
struct Rpc<'a> {
    m: &'a Method,
    /// The Rust method name (`put`, `r#type`).
    ident: String,
    /// `ident` without a raw prefix, for derived names.
    base: String,
    /// The wire-name constant (`PUT`).
    konst: String,
    /// `package.Service/Method`.
    wire: String,
    payloads: Payloads,
}

fn mode(carries: bool) -> &'static str {
    if carries {
        "::pagerpc::typed::WithPayload"
    } else {
        "::pagerpc::typed::NoPayload"
    }
}

/// The rustdoc of an item: the `.proto` comments, or `fallback` when there
/// are none, then `extra` lines.
fn docs(buf: &mut String, comments: &Comments, fallback: &str, extra: &[String]) {
    let has_comments = !comments.leading.is_empty() || !comments.trailing.is_empty();
    if has_comments {
        let c = Comments {
            leading_detached: Vec::new(),
            leading: comments.leading.clone(),
            trailing: comments.trailing.clone(),
        };
        c.append_with_indent(0, buf);
    } else {
        let _ = writeln!(buf, "/// {fallback}");
    }
    for line in extra {
        buf.push_str("///\n");
        let _ = writeln!(buf, "/// {line}");
    }
}

/// A sentence on the rpc's shape and payloads, for its rustdoc.
fn shape_doc(r: &Rpc<'_>) -> String {
    let shape = match (r.m.client_streaming, r.m.server_streaming) {
        (false, false) => "Unary",
        (true, false) => "Client-streaming",
        (false, true) => "Server-streaming",
        (true, true) => "Bidirectional streaming",
    };
    let payloads = match (r.payloads.request, r.payloads.response) {
        (false, false) => "no payloads",
        (true, false) => "payloads on the client's messages",
        (false, true) => "payloads on the server's messages",
        (true, true) => "payloads both ways",
    };
    format!("{shape}, {payloads}; on the wire `{}`.", r.wire)
}

impl Generator {
    fn rpcs<'a>(&self, service: &'a Service) -> Vec<Rpc<'a>> {
        let full = full_name(service);
        service
            .methods
            .iter()
            .map(|m| {
                let wire = format!("{full}/{}", m.proto_name);
                let base = m.name.trim_start_matches("r#").to_owned();
                Rpc {
                    m,
                    ident: m.name.clone(),
                    konst: base.to_shouty_snake_case(),
                    base,
                    payloads: self.payloads.get(&wire).copied().unwrap_or_default(),
                    wire,
                }
            })
            .collect()
    }

    /// Names that would clash in the generated code.
    fn check(&self, service: &Service, rpcs: &[Rpc<'_>]) -> Vec<String> {
        let full = full_name(service);
        let mut errors = Vec::new();
        let mut taken: HashSet<String> = CLIENT_RESERVED.iter().map(|s| s.to_string()).collect();
        let mut konsts = HashSet::new();
        for r in rpcs {
            for name in [r.base.clone(), format!("{}_with", r.base)] {
                if !taken.insert(name.clone()) {
                    errors.push(format!(
                        "{full}: rpc `{}` would generate a client method `{name}`, which another \
                         generated method already has; rename the rpc",
                        r.m.proto_name
                    ));
                }
            }
            if !konsts.insert(r.konst.clone()) {
                errors.push(format!(
                    "{full}: rpcs differing only in case clash as `{}`",
                    r.konst
                ));
            }
        }
        errors
    }

    fn methods_module(&self, service: &Service, rpcs: &[Rpc<'_>], buf: &mut String) {
        let full = full_name(service);
        let _ = writeln!(
            buf,
            "/// The wire names of the `{full}` service's methods, for hand-written peers \
             and the string API."
        );
        // Generated items a program does not use are not its mistake: no
        // dead-code warnings for them (a binary may call one rpc of many).
        let _ = writeln!(
            buf,
            "#[allow(dead_code)]\npub mod {} {{",
            methods_module(service)
        );
        for r in rpcs {
            let _ = writeln!(buf, "/// `{}`.", r.m.proto_name);
            let _ = writeln!(buf, "pub const {}: &str = \"{}\";", r.konst, r.wire);
        }
        buf.push_str("}\n");
    }

    fn client(&self, service: &Service, rpcs: &[Rpc<'_>], buf: &mut String, f: Flavor) {
        let full = full_name(service);
        let name = format!("{}{}Client", service.name, f.infix());
        let m = methods_module(service);
        let (lib, about) = match f {
            Flavor::Blocking => ("Client", "Clones share the connection."),
            Flavor::Async => (
                "AsyncClient",
                "Clones share the connection; dropping a call's future cancels the call \
                 (pagerpc's `tokio` feature).",
            ),
        };
        docs(
            buf,
            &service.comments,
            &format!("The `{full}` service."),
            &[format!(
                "The {}client of `{full}`: one method per rpc, over one \
                 `pagerpc::{lib}` connection. {about}",
                f.adjective()
            )],
        );
        let _ = writeln!(
            buf,
            "#[derive(Clone, Debug)]\n#[allow(dead_code)]\npub struct {name} {{\n    client: ::pagerpc::{lib},\n}}\n"
        );
        let _ = writeln!(
            buf,
            "#[allow(clippy::type_complexity, dead_code)]\nimpl {name} {{"
        );
        let (asyncness, awaiting, addr) = match f {
            Flavor::Blocking => ("", "", "impl ::std::net::ToSocketAddrs"),
            Flavor::Async => (
                "async ",
                ".await",
                "impl ::std::net::ToSocketAddrs + ::std::marker::Send + 'static",
            ),
        };
        let _ = writeln!(
            buf,
            "/// Wraps a connected client.
pub fn new(client: ::pagerpc::{lib}) -> Self {{
    Self {{ client }}
}}

/// Connects to `addr` with default settings.
///
/// # Errors
/// When the connection cannot be made.
pub {asyncness}fn connect(addr: {addr}) -> ::std::io::Result<Self> {{
    ::pagerpc::{lib}::connect(addr){awaiting}.map(Self::new)
}}

/// Connects to `addr` with `config`.
///
/// # Errors
/// When the connection cannot be made.
pub {asyncness}fn connect_with(addr: {addr}, config: ::pagerpc::ClientConfig) -> ::std::io::Result<Self> {{
    ::pagerpc::{lib}::connect_with(addr, config){awaiting}.map(Self::new)
}}

/// The client underneath (counters, the string API).
pub fn inner(&self) -> &::pagerpc::{lib} {{
    &self.client
}}

/// The client underneath.
pub fn into_inner(self) -> ::pagerpc::{lib} {{
    self.client
}}
"
        );
        for r in rpcs {
            self.client_method(r, &m, buf, f);
        }
        buf.push_str("}\n");
    }

    fn client_method(&self, r: &Rpc<'_>, module: &str, buf: &mut String, f: Flavor) {
        let (input, output) = (&r.m.input_type, &r.m.output_type);
        let (ident, with) = (&r.ident, format!("{}_with", r.base));
        let wire = format!("{module}::{}", r.konst);
        let pin = mode(r.payloads.request);
        let pout = mode(r.payloads.response);
        let a = f.infix();
        let lib = match f {
            Flavor::Blocking => "Client",
            Flavor::Async => "AsyncClient",
        };
        let errors = format!(
            "///\n/// # Errors\n/// The call's status: the server's, or a local failure \
             (deadline, connection, limits), as for `pagerpc::{lib}::call`.\n"
        );
        // rustdoc cannot link to a raw identifier (`r#type`): name it.
        let link = if ident.starts_with("r#") {
            format!("`{}`", r.base)
        } else {
            format!("[`{ident}`](Self::{ident})")
        };
        let (req_params, req_args, req_payload) = match (r.m.client_streaming, r.payloads.request) {
            (true, _) => (String::new(), String::new(), String::new()),
            (false, true) => (
                format!(
                    "request: &{input}, payload: impl ::std::convert::Into<::pagerpc::Payload>, "
                ),
                "request, payload, ".to_owned(),
                "payload.into()".to_owned(),
            ),
            (false, false) => (
                format!("request: &{input}, "),
                "request, ".to_owned(),
                "::pagerpc::Payload::Empty".to_owned(),
            ),
        };
        let typed = "::pagerpc::typed";
        let (ret, body) = match (r.m.client_streaming, r.m.server_streaming) {
            (false, false) => (
                format!("::pagerpc::Response<{output}>"),
                match f {
                    Flavor::Blocking => format!(
                        "{typed}::call_unary::<_, _, {pout}>(&self.client, {wire}, request, \
                         {req_payload}, options)"
                    ),
                    Flavor::Async => format!(
                        "{typed}::call_unary_async::<_, _, {pout}>(&self.client, {wire}, \
                         request, {req_payload}, options).await"
                    ),
                },
            ),
            (true, false) => (
                format!(
                    "({typed}::{a}Sender<{input}, {pin}>, \
                     {typed}::{a}PendingResponse<{output}, {pout}>)"
                ),
                format!(
                    "let (tx, rx) = self.client.client_stream({wire}, options)?;
                     Ok(({typed}::{a}Sender::new(tx), {typed}::{a}PendingResponse::new(rx, {wire})))"
                ),
            ),
            (false, true) => (
                format!("{typed}::{a}Receiver<{output}, {pout}>"),
                format!(
                    "let rx = self.client.server_stream({wire}, request, {req_payload}, options)?;
                     Ok({typed}::{a}Receiver::new(rx, {wire}))"
                ),
            ),
            (true, true) => (
                format!(
                    "({typed}::{a}Sender<{input}, {pin}>, {typed}::{a}Receiver<{output}, {pout}>)"
                ),
                format!(
                    "let (tx, rx) = self.client.bidi_stream({wire}, options)?;
                     Ok(({typed}::{a}Sender::new(tx), {typed}::{a}Receiver::new(rx, {wire})))"
                ),
            ),
        };
        // Only a unary call is awaited; stream openers return their
        // handles at once.
        let unary = !r.m.client_streaming && !r.m.server_streaming;
        let (asyncness, awaiting) = match f {
            Flavor::Async if unary => ("async ", ".await"),
            _ => ("", ""),
        };
        docs(
            buf,
            &r.m.comments,
            &format!("Calls `{}`.", r.m.proto_name),
            &[shape_doc(r)],
        );
        buf.push_str(&errors);
        let _ = writeln!(
            buf,
            "pub {asyncness}fn {ident}(&self, {req_params}) -> ::std::result::Result<{ret}, ::pagerpc::CallError> {{
    self.{with}({req_args}&::pagerpc::CallOptions::default()){awaiting}
}}

/// {link} with per-call options (timeout, metadata).
{errors}pub {asyncness}fn {with}(&self, {req_params}options: &::pagerpc::CallOptions) -> ::std::result::Result<{ret}, ::pagerpc::CallError> {{
    {body}
}}
"
        );
    }

    /// The server trait (`X`, or `XAsync` with `async fn` handlers) and its
    /// registration (`XServer` / `XAsyncServer`).
    fn server(&self, service: &Service, rpcs: &[Rpc<'_>], buf: &mut String, f: Flavor) {
        let full = full_name(service);
        let tr = format!("{}{}", service.name, f.infix());
        let m = methods_module(service);
        let a = f.infix();
        let typed = "::pagerpc::typed";
        let (ctx, lifetime, how) = match f {
            Flavor::Blocking => (
                "&::pagerpc::Context",
                "'_, ",
                format!(
                    "`pagerpc::Server::builder().add_service({tr}Server::new(my_impl))`. Unary \
                     handlers run on the server's pool threads, streaming ones on threads of \
                     their own."
                ),
            ),
            Flavor::Async => (
                "::pagerpc::Context",
                "",
                format!(
                    "`pagerpc::AsyncServer::builder().add_service({tr}Server::new(my_impl))` \
                     (pagerpc's `tokio` feature); implement it with `async fn`s. Each call runs \
                     as a task on the runtime."
                ),
            ),
        };
        docs(
            buf,
            &service.comments,
            &format!("The `{full}` service."),
            &[format!(
                "The {}server side of `{full}`: implement it and register it with {how}",
                f.adjective()
            )],
        );
        let _ = writeln!(
            buf,
            "#[allow(dead_code)]\npub trait {tr}: ::std::marker::Send + ::std::marker::Sync + 'static {{"
        );
        for r in rpcs {
            let (input, output) = (&r.m.input_type, &r.m.output_type);
            let pin = mode(r.payloads.request);
            let pout = mode(r.payloads.response);
            let payload_param = if r.payloads.request {
                "payload: ::pagerpc::Pages, "
            } else {
                ""
            };
            let inbound = format!("requests: {typed}::{a}Inbound<{lifetime}{input}, {pin}>, ");
            let outbound = format!("responses: {typed}::{a}Outbound<{lifetime}{output}, {pout}>, ");
            let (params, ret) = match (r.m.client_streaming, r.m.server_streaming) {
                (false, false) => (
                    format!("request: {input}, {payload_param}"),
                    response_type(output, r.payloads.response),
                ),
                (true, false) => (inbound, response_type(output, r.payloads.response)),
                (false, true) => (
                    format!("request: {input}, {payload_param}{outbound}"),
                    "()".to_owned(),
                ),
                (true, true) => (format!("{inbound}{outbound}"), "()".to_owned()),
            };
            let result = format!("::std::result::Result<{ret}, ::pagerpc::Status>");
            let ret = match f {
                Flavor::Blocking => result,
                Flavor::Async => {
                    format!("impl ::std::future::Future<Output = {result}> + ::std::marker::Send")
                }
            };
            docs(
                buf,
                &r.m.comments,
                &format!("Handles `{}`.", r.m.proto_name),
                &[shape_doc(r)],
            );
            buf.push_str(
                "///\n/// # Errors\n/// The status the caller gets instead of a response (or as \
                 the end of its stream).\n",
            );
            let _ = writeln!(buf, "fn {}(&self, ctx: {ctx}, {params}) -> {ret};", r.ident);
        }
        buf.push_str("}\n\n");

        let server = format!("{tr}Server");
        let (service_trait, builder) = match f {
            Flavor::Blocking => ("Service", "ServerBuilder"),
            Flavor::Async => ("AsyncService", "AsyncServerBuilder"),
        };
        let _ = writeln!(
            buf,
            "/// Registers a [`{tr}`] implementation: \
`builder.add_service({server}::new(my_impl))` on a `pagerpc::{builder}`.
#[allow(dead_code)]
pub struct {server}<S: {tr}> {{
    inner: ::std::sync::Arc<S>,
}}

#[allow(dead_code)]
impl<S: {tr}> {server}<S> {{
    /// Serves `service`.
    pub fn new(service: S) -> Self {{
        Self::from_arc(::std::sync::Arc::new(service))
    }}

    /// Serves a shared `service`.
    pub fn from_arc(service: ::std::sync::Arc<S>) -> Self {{
        Self {{ inner: service }}
    }}
}}

impl<S: {tr}> ::std::fmt::Debug for {server}<S> {{
    fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {{
        f.write_str(\"{server}\")
    }}
}}

impl<S: {tr}> {typed}::{service_trait} for {server}<S> {{
    const NAME: &'static str = \"{full}\";

    fn register(self, builder: ::pagerpc::{builder}) -> ::pagerpc::{builder} {{"
        );
        let reg = match f {
            Flavor::Blocking => "register_",
            Flavor::Async => "register_async_",
        };
        for (i, r) in rpcs.iter().enumerate() {
            let (input, output) = (&r.m.input_type, &r.m.output_type);
            let pin = mode(r.payloads.request);
            let pout = mode(r.payloads.response);
            let wire = format!("{m}::{}", r.konst);
            let id = &r.ident;
            let (pl_pat, pl_arg) = if r.payloads.request {
                ("payload", "payload, ")
            } else {
                ("()", "")
            };
            let wrap = if r.payloads.response {
                ""
            } else {
                ".map(|response| (response, ()))"
            };
            let (kind, params, args, wrap) = match (r.m.client_streaming, r.m.server_streaming) {
                (false, false) => (
                    "unary",
                    format!("ctx, request, {pl_pat}"),
                    format!("ctx, request, {pl_arg}"),
                    wrap,
                ),
                (true, false) => (
                    "client_stream",
                    "ctx, requests".to_owned(),
                    "ctx, requests".to_owned(),
                    wrap,
                ),
                (false, true) => (
                    "server_stream",
                    format!("ctx, request, {pl_pat}, responses"),
                    format!("ctx, request, {pl_arg}responses"),
                    "",
                ),
                (true, true) => (
                    "bidi_stream",
                    "ctx, requests, responses".to_owned(),
                    "ctx, requests, responses".to_owned(),
                    "",
                ),
            };
            let (turbofish, call) = match f {
                Flavor::Blocking => ("_", format!("svc.{id}({args}){wrap}")),
                Flavor::Async => (
                    "_, _",
                    format!("{{ let svc = svc.clone(); async move {{ svc.{id}({args}).await{wrap} }} }}"),
                ),
            };
            let call = format!(
                "{typed}::{reg}{kind}::<{input}, {output}, {pin}, {pout}, {turbofish}>(builder, \
                 {wire}, move |{params}| {call})"
            );
            // The last registration is the function's value (no `let` and
            // return, which clippy would flag).
            let block = format!("{{ let svc = self.inner.clone(); {call} }}");
            if i + 1 == rpcs.len() {
                let _ = writeln!(buf, "{block}");
            } else {
                let _ = writeln!(buf, "let builder = {block};");
            }
        }
        if rpcs.is_empty() {
            buf.push_str("builder\n");
        }
        buf.push_str("}\n}\n");
    }
}

/// Which API a piece of generated code is for.
#[derive(Clone, Copy)]
enum Flavor {
    /// `pagerpc::Client` and `pagerpc::Server`.
    Blocking,
    /// `pagerpc::AsyncClient` and `pagerpc::AsyncServer` (feature `tokio`).
    Async,
}

impl Flavor {
    /// What goes between a service's name and `Client`/`Server`, and
    /// before a typed handle's name.
    fn infix(self) -> &'static str {
        match self {
            Flavor::Blocking => "",
            Flavor::Async => "Async",
        }
    }

    fn adjective(self) -> &'static str {
        match self {
            Flavor::Blocking => "",
            Flavor::Async => "async ",
        }
    }
}

fn response_type(output: &str, payload: bool) -> String {
    if payload {
        format!("({output}, ::pagerpc::Payload)")
    } else {
        output.to_owned()
    }
}

fn full_name(service: &Service) -> String {
    if service.package.is_empty() {
        service.proto_name.clone()
    } else {
        format!("{}.{}", service.package, service.proto_name)
    }
}

fn methods_module(service: &Service) -> String {
    format!("{}_methods", service.name.to_snake_case())
}

impl ServiceGenerator for Generator {
    fn generate(&mut self, service: Service, buf: &mut String) {
        let rpcs = self.rpcs(&service);
        let errors = self.check(&service, &rpcs);
        if !errors.is_empty() {
            self.errors.borrow_mut().extend(errors);
            return;
        }
        self.methods_module(&service, &rpcs, buf);
        let flavors: &[Flavor] = if self.async_api {
            &[Flavor::Blocking, Flavor::Async]
        } else {
            &[Flavor::Blocking]
        };
        for &f in flavors {
            if self.client {
                self.client(&service, &rpcs, buf, f);
            }
            if self.server {
                self.server(&service, &rpcs, buf, f);
            }
        }
    }
}
