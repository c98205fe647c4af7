// cumo_test_spm_train CORPUS DIR VOCAB: trains a BPE SentencePiece model of VOCAB pieces on CORPUS (one sentence a
// line) and writes DIR/tokenizer.model, as a Llama/Mistral release ships it (unk 0, bos 1, eos 2, no pad piece).
// For tests/app/pretrained.sh's sentencepiece case: a cumo_train run on a tokenizer.model, exported and prompted.
#include <iostream>
#include <string>

#include <sentencepiece_trainer.h>

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: cumo_test_spm_train CORPUS DIR VOCAB\n";
    return 2;
  }
  const std::string corpus = argv[1], dir = argv[2], vocab = argv[3];
  const auto st = sentencepiece::SentencePieceTrainer::Train(
      "--input=" + corpus + " --model_prefix=" + dir + "/tokenizer --vocab_size=" + vocab +
      " --model_type=bpe --character_coverage=1.0 --hard_vocab_limit=false --minloglevel=2"
      " --bos_id=1 --eos_id=2 --unk_id=0 --pad_id=-1");
  if (!st.ok()) {
    std::cerr << "cumo_test_spm_train: " << st.ToString() << "\n";
    return 1;
  }
  return 0;
}
