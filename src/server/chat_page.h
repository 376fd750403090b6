// The chat page served at GET /: plain HTML and JavaScript that talk to /v1/chat/completions,
// streaming.
#pragma once

namespace kestrel::server {

const char* chat_page_html();

}  // namespace kestrel::server
