#pragma once
// The TCP connection a request arrived on, for a handler that has none: cpp-httplib 0.11 gives
// its handlers the connection's two addresses but not its socket. Linux only (/proc/self/fd);
// elsewhere nothing is found and every question answers "still there".

#include <string>

namespace kestrel::server {

// The connection's socket: the descriptor of this process whose local and peer addresses are
// these (numeric hosts as getnameinfo writes them, as httplib fills Request's fields), or -1.
// A TCP connection's four values are unique while it is open, so the answer is its socket.
int find_connection(const std::string& local_addr, int local_port, const std::string& remote_addr,
                    int remote_port);

// Whether the client has closed or reset the connection (an end of stream is waiting to be
// read, or an error), without reading anything: a waiting request's cue to give up its slot.
// A client that only shut down its sending side counts as gone, as nginx counts it. -1: false.
bool connection_closed(int fd);

}  // namespace kestrel::server
