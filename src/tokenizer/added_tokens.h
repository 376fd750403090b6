// Added (special and non-special) tokens: found in the input before pre-tokenization, the way
// HF's AddedVocabulary does it: leftmost-longest matches, then the single_word, lstrip and rstrip
// rules of each token.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace kestrel {

struct AddedToken {
  std::string content;
  int32_t id = -1;
  bool single_word = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = true;
  bool special = false;
};

// A piece of the input: an added token (id >= 0) or text for the normal pipeline (id == -1).
struct AddedSplit {
  uint32_t begin, end;  // byte offsets in the split text
  int32_t id;
};

class AddedTokenMatcher {
 public:
  // `pattern` is what to look for in the text (the content, or its normalized form).
  void add(std::string_view pattern, const AddedToken& token);
  bool empty() const { return tokens_.empty(); }

  // Splits `text` (valid UTF-8) into pieces covering it, in order, like HF's find_matches
  // (which lets an rstrip token's piece overlap the next match). Empty text gives no pieces.
  void split(std::string_view text, std::vector<AddedSplit>& out) const;

 private:
  struct Node {
    int32_t token = -1;  // index into tokens_ when a pattern ends here
    std::vector<std::pair<uint8_t, int32_t>> children;  // (byte, node)
  };
  struct Match {
    size_t begin, end;
    int32_t token;
  };
  bool find_leftmost_longest(std::string_view text, size_t from, Match& match) const;

  std::vector<Node> nodes_{Node{}};
  std::vector<AddedToken> tokens_;
  bool first_byte_[256] = {};
};

}  // namespace kestrel
