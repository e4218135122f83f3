#include "engine/tokenizer/sentencepiece_model.h"

#include <sentencepiece_processor.h>

#include "engine/tokenizer/vocab_util.h"

namespace moa {

SentencePieceModel::SentencePieceModel()
    : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {}
SentencePieceModel::~SentencePieceModel() = default;

std::unique_ptr<SentencePieceModel> SentencePieceModel::Load(const std::string& path,
                                                             std::string* error) {
  std::unique_ptr<SentencePieceModel> m(new SentencePieceModel());
  if (auto s = m->sp_->Load(path); !s.ok()) {
    *error = s.ToString();
    return nullptr;
  }
  // The normalizer spec is only reachable through the protobuf header, which is not
  // installed: observe add_dummy_prefix instead.
  std::vector<std::string> probe;
  m->dummy_prefix_ =
      m->sp_->Encode("a", &probe).ok() && !probe.empty() && probe[0].rfind("\xE2\x96\x81", 0) == 0;
  return m;
}

bool SentencePieceModel::Encode(std::string_view text, std::vector<int>* ids,
                                std::string* error) const {
  if (auto s = sp_->Encode(text, ids); !s.ok()) {
    *error = s.ToString();
    return false;
  }
  return true;
}

int SentencePieceModel::size() const { return sp_->GetPieceSize(); }
std::string SentencePieceModel::piece(int id) const { return sp_->IdToPiece(id); }
float SentencePieceModel::score(int id) const { return sp_->GetScore(id); }
int SentencePieceModel::gguf_type(int id) const {
  return sp_->IsUnknown(id)   ? kTokenUnknown
         : sp_->IsControl(id) ? kTokenControl
         : sp_->IsByte(id)    ? kTokenByte
         : sp_->IsUnused(id)  ? kTokenUnused
                              : kTokenNormal;
}
int SentencePieceModel::bos_id() const { return sp_->bos_id(); }
int SentencePieceModel::eos_id() const { return sp_->eos_id(); }
int SentencePieceModel::unk_id() const { return sp_->unk_id(); }

}  // namespace moa
