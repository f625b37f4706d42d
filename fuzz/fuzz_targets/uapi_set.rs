//! UAPI text from a hostile client: parsing never panics, and whatever parses
//! renders back to text that parses to the same request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wiremesh_uapi::{DeviceSnapshot, Request, SetRequest};

fuzz_target!(|data: &[u8]| {
    // Lossy, so every input reaches the parser (the server rejects invalid UTF-8
    // before parsing anyway).
    let text = String::from_utf8_lossy(data);
    let text = text.as_ref();
    if let Ok(Request::Set(req)) = Request::parse(text) {
        let again = SetRequest::parse(&req.render()).expect("rendered request parses");
        assert_eq!(again, req);
    }
    if let Ok(snap) = DeviceSnapshot::parse(text) {
        let again = DeviceSnapshot::parse(&snap.render()).expect("rendered snapshot parses");
        assert_eq!(again, snap);
    }
});
