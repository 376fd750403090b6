// The HTTP server's lifecycle (src/server/server.h) on a loopback port, without a model.
#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <thread>

#ifdef KESTREL_HAVE_SERVER
#include "server/server.h"

namespace kestrel::server {
namespace {

// httplib 0.11's stop() does nothing until its listening thread has marked the server running,
// which that thread does only once it is scheduled: a stop() right after start() used to leave
// the thread in accept() for ever and Server::stop() joining it for ever (an embedding that stops
// a server it has just started; a SIGTERM taken before the listening thread ran). Without the
// fix this hung within a few rounds; a hang cannot be undone from here, so a guard ends the
// process instead of letting the suite wait for ever.
TEST(Server, StopRightAfterStartReturns) {
  std::mutex mutex;
  std::condition_variable finished;
  bool done = false;
  std::thread guard([&] {
    std::unique_lock lock(mutex);
    if (!finished.wait_for(lock, std::chrono::seconds(120), [&] { return done; })) {
      std::fprintf(stderr, "Server.StopRightAfterStartReturns: stop() hung (120 s)\n");
      std::_Exit(1);
    }
  });
  for (int i = 0; i < 100; ++i) {
    ServerOptions options;
    options.port = 0;
    options.http_threads = 2;
    Metrics metrics;
    Server server(options, metrics);
    // No ASSERT here: returning with `guard` running would end the suite in std::terminate.
    const Status started = server.start();
    EXPECT_TRUE(started.is_ok()) << started.message();
    if (!started.is_ok()) break;
    server.stop();  // at once, on this thread: the listening thread may not have run yet
  }
  {
    std::lock_guard lock(mutex);
    done = true;
  }
  finished.notify_all();
  guard.join();
}

}  // namespace
}  // namespace kestrel::server
#endif
