// The connection lookup of a handler that has no socket (src/server/peer.h), on a real loopback
// connection.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "server/peer.h"

namespace kestrel::server {
namespace {

int port_of(int fd, bool peer) {
  sockaddr_in addr{};
  socklen_t len = sizeof(addr);
  const int rc = peer ? getpeername(fd, reinterpret_cast<sockaddr*>(&addr), &len)
                      : getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  return rc == 0 ? ntohs(addr.sin_port) : -1;
}

// A listening socket, a client connected to it and the server's side of the connection.
struct Loopback {
  int listener = -1, client = -1, server = -1;
  Loopback() {
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    listener = socket(AF_INET, SOCK_STREAM, 0);
    if (listener < 0 || bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
        listen(listener, 1) != 0) {
      return;
    }
    addr.sin_port = htons(uint16_t(port_of(listener, false)));
    client = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(client, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) return;
    server = accept(listener, nullptr, nullptr);
  }
  ~Loopback() {
    for (int fd : {listener, client, server}) {
      if (fd >= 0) close(fd);
    }
  }
};

TEST(Peer, FindsTheServersSideOfAConnectionByItsAddresses) {
  Loopback c;
  ASSERT_GE(c.server, 0);
  const int server_port = port_of(c.server, false);
  const int client_port = port_of(c.server, true);
  EXPECT_EQ(find_connection("127.0.0.1", server_port, "127.0.0.1", client_port), c.server);
  // The client's side has the same two addresses the other way round.
  EXPECT_EQ(find_connection("127.0.0.1", client_port, "127.0.0.1", server_port), c.client);
  EXPECT_EQ(find_connection("127.0.0.1", server_port, "127.0.0.1",
                            client_port + 1 == 65536 ? 1 : client_port + 1),
            -1);
  EXPECT_EQ(find_connection("127.0.0.2", server_port, "127.0.0.1", client_port), -1);
  EXPECT_EQ(find_connection("127.0.0.1", -1, "127.0.0.1", client_port), -1);
}

TEST(Peer, AConnectionIsClosedOnceTheClientHangsUpNotWhileItSendsMore) {
  Loopback c;
  ASSERT_GE(c.server, 0);
  EXPECT_FALSE(connection_closed(c.server));
  // A pipelined next request is data to read, not an end.
  ASSERT_EQ(write(c.client, "GET / HTTP/1.1\r\n", 16), 16);
  EXPECT_FALSE(connection_closed(c.server));
  close(c.client);
  c.client = -1;
  EXPECT_TRUE(connection_closed(c.server));
  EXPECT_FALSE(connection_closed(-1));
}

}  // namespace
}  // namespace kestrel::server
